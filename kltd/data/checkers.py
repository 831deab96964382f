"""Answer checkers: is a response's answer the reference answer?

Each checker has two halves. `reference(text)` extracts the gold answer from a dataset's answer field (or
its reference response) once, when the data are loaded: a row it cannot read is a bad row. `check(response,
example)` grades a model's response against it. Used by the evaluation (accuracy, pass@k) and as the
offline-RL correctness reward.

- exact:    the response, stripped, equals the reference, stripped;
- gsm8k:    the number after the last "####", else the last number in the text (commas, "$" and a
            trailing "." ignored), compared as numbers;
- boxed:    the \\boxed{} answer of MATH-style data, compared by math-verify (symbolic equivalence:
            \\frac{1}{2} equals 0.5, \\sqrt{12} equals 2\\sqrt{3});
- addition: the built-in task's final answer (kltd.data.addition);
- markov:   a walk the Markov task's chain accepts (every transition allowed, <eos> within the horizon;
            kltd.data.markov.Walk). Its answers come with the generated examples, never from a text.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from kltd.data import addition
from kltd.data.example import Example

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def gsm8k_number(text: str) -> Decimal | None:
    """The number after the last '####', else the last number in the text; None when there is none."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    pick = found[0] if "####" in text else found[-1]
    try:
        return Decimal(pick.replace(",", "").replace("$", "").rstrip("."))
    except InvalidOperation:
        return None


def _math_verify():
    try:
        import math_verify
    except ImportError as error:  # a dependency of kltd; only a broken install lacks it
        raise RuntimeError("data.checker=boxed needs the math-verify package: pip install math-verify") from error
    return math_verify


def _timeout():
    # math-verify bounds its work with SIGALRM, which only the main thread may use
    return 5 if threading.current_thread() is threading.main_thread() else None


def boxed_answer(text: str):
    """math-verify's parse of a solution or answer (a list; empty when nothing could be read)."""
    math_verify = _math_verify()
    seconds = _timeout()
    parsed = math_verify.parse(text, parsing_timeout=seconds)
    if not parsed and "\\boxed" not in text and "$" not in text:
        parsed = math_verify.parse(f"${text}$", parsing_timeout=seconds)  # a bare answer field such as 1/2
    return parsed


@dataclass(frozen=True)
class Checker:
    name: str
    reference: Callable[[str], object]  # the gold answer from an answer text; raises ValueError if unreadable
    check: Callable[[str, Example], bool]
    unreadable: str = "unreadable answer"  # what an answer `reference` cannot read is counted as (data.bad_rows)

    def __call__(self, response: str, example: Example) -> bool:
        return example.answer is not None and self.check(response, example)


def _exact_reference(text: str) -> str:
    if not text.strip():
        raise ValueError("empty answer (data.checker=exact compares a response with it)")
    return text.strip()


def _gsm8k_reference(text: str) -> Decimal:
    number = gsm8k_number(text)
    if number is None:
        raise ValueError("no number in the answer (GSM8K answers end in '#### <number>')")
    return number


def _boxed_reference(text: str):
    parsed = boxed_answer(text)
    if not parsed:
        raise ValueError("no answer math-verify can read (MATH solutions hold a \\boxed{} answer)")
    return parsed


def _markov_reference(text: str):
    raise ValueError("data.checker=markov grades walks of the built-in chain and reads no answer text; use data=markov")


def _boxed_check(response: str, example: Example) -> bool:
    math_verify = _math_verify()
    try:
        return bool(math_verify.verify(example.answer, math_verify.parse(response, parsing_timeout=_timeout()),
                                       timeout_seconds=_timeout()))
    except Exception:  # an unparseable response is a wrong answer, not a crash
        return False


CHECKERS = {
    "exact": Checker("exact", _exact_reference, lambda response, e: response.strip() == e.answer, "empty answer"),
    "gsm8k": Checker("gsm8k", _gsm8k_reference, lambda response, e: gsm8k_number(response) == e.answer,
                     "no number in the answer"),
    "boxed": Checker("boxed", _boxed_reference, _boxed_check, "no answer math-verify can read"),
    "addition": Checker("addition", lambda text: addition.parse_answer(text),
                        lambda response, e: addition.is_correct(response, e)),
    "markov": Checker("markov", _markov_reference, lambda response, e: e.answer.accepts_text(response)),
}


def get_checker(name: str) -> Checker | None:
    """The checker called `name`; None for "none" (no accuracy: the teacher-free metrics only)."""
    return None if name == "none" else CHECKERS[name]
