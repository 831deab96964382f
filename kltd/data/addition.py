"""The built-in task: multi-step addition with a written scratchpad.

A prompt is a chain of 2 to 5 terms, each a number in 0..99, ending in "=":

    12+45+7+88=

The response writes every step of the running sum, restating its two operands, separated by commas,
then ";" and the final answer:

    12+45=57,57+7=64,64+88=152;152

Each step starts from the sum the previous step wrote, so a wrong early step poisons every later step
and the answer (exposure bias shows). Restating the operands keeps each step local (copy the running
sum and the next term, then add), which small transformers learn in a few thousand steps; the bare
list of partial sums ("57,64,152") makes them count terms and learns far more slowly.

Only the final answer is graded (exact match); `parse_answer` reads it back. Everything is plain
Python: no torch, deterministic from a seed.
"""

from __future__ import annotations

import random
import re

from kltd.data.example import Example

# Every character a prompt or a response can contain (the toy tokenizer's vocabulary).
CHARACTERS = "0123456789+=,;"
MAX_TERM = 99
MIN_TERMS_ALLOWED = 2

_PROMPT = re.compile(r"\d+(?:\+\d+)+=")
_STEP = r"\d+\+\d+=\d+"
_RESPONSE = re.compile(rf"({_STEP}(?:,{_STEP})*);(\d+)")


def solve(prompt: str) -> str:
    """The correct response for a prompt: '12+45+7+88=' -> '12+45=57,57+7=64,64+88=152;152'."""
    if not _PROMPT.fullmatch(prompt):
        raise ValueError(f"not an addition prompt (expected e.g. '12+45+7='): {prompt!r}")
    terms = [int(t) for t in prompt[:-1].split("+")]
    steps, total = [], terms[0]
    for term in terms[1:]:
        steps.append(f"{total}+{term}={total + term}")
        total += term
    return ",".join(steps) + f";{total}"


def parse_answer(response: str) -> int | None:
    """The final answer of a response in the task's format, or None when the response is malformed."""
    match = _RESPONSE.fullmatch(response.strip())
    return int(match.group(2)) if match else None


def is_correct(response: str, example: Example) -> bool:
    """Exact match of the final answer (a malformed response is wrong)."""
    return parse_answer(response) == example.answer


def make_example(terms: list[int]) -> Example:
    prompt = "+".join(map(str, terms)) + "="
    return Example(prompt=prompt, response=solve(prompt), answer=sum(terms))


def _space_size(n_terms: int) -> int:
    return (MAX_TERM + 1) ** n_terms


def make_splits(
    seed: int, n_train: int, n_eval: int, min_terms: int = 2, max_terms: int = 5
) -> tuple[list[Example], list[Example]]:
    """Train and eval examples, deterministic from `seed`; no prompt appears twice or in both splits.

    The number of terms is drawn uniformly from [min_terms, max_terms] (a length whose prompts are all
    used up is skipped), then each term uniformly from 0..99. The eval split is drawn first, so it
    depends only on (seed, n_eval, min_terms, max_terms), not on n_train.
    """
    if min_terms < MIN_TERMS_ALLOWED:
        raise ValueError(f"min_terms={min_terms}: a chain needs at least {MIN_TERMS_ALLOWED} terms")
    if max_terms < min_terms:
        raise ValueError(f"max_terms={max_terms} must be >= min_terms={min_terms}")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"split sizes must be >= 0 (got n_train={n_train}, n_eval={n_eval})")
    lengths = list(range(min_terms, max_terms + 1))
    available = sum(_space_size(k) for k in lengths)
    if n_train + n_eval > available:
        raise ValueError(
            f"asked for {n_train} train + {n_eval} eval distinct prompts, but chains of {min_terms}-{max_terms} "
            f"terms in 0..{MAX_TERM} only have {available} distinct prompts; lower n_train/n_eval or raise max_terms"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    used = {k: 0 for k in lengths}

    def draw(count: int) -> list[Example]:
        out = []
        while len(out) < count:
            open_lengths = [k for k in lengths if used[k] < _space_size(k)]
            k = rng.choice(open_lengths)
            example = make_example([rng.randint(0, MAX_TERM) for _ in range(k)])
            if example.prompt in seen:
                continue
            seen.add(example.prompt)
            used[k] += 1
            out.append(example)
        return out

    eval_split = draw(n_eval)
    train_split = draw(n_train)
    return train_split, eval_split
