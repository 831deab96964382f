"""Responses for the built-in task on disk (JSONL): what `kltd make-data` writes for it, and what
data.responses_file trains on in place of the task's correct responses.

One JSON object per line: {"prompt": "12+45=", "completion": "57;57", "source": "student"} (TRL's standard
format; the key "response" is read too). Responses may be wrong: offline RL learns from imperfect data.
Prompts must be task prompts; the reference answer is recomputed from the prompt, never trusted from the
file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kltd.data.addition import CHARACTERS, solve
from kltd.data.example import Example
from kltd.data.formats import DataError


class DataFileError(DataError):
    """A malformed responses file; the message names the file and line."""


@dataclass(frozen=True)
class ResponseRow:
    example: Example  # the prompt and its correct answer
    response: str  # the response to learn from (possibly wrong)
    source: str = "dataset"


def _check_text(path, number, field, value) -> str:
    if not isinstance(value, str):
        raise DataFileError(f"{path}:{number}: '{field}' must be a string, got {type(value).__name__}")
    bad = sorted(set(value) - set(CHARACTERS))
    if bad:
        raise DataFileError(f"{path}:{number}: '{field}' has characters outside the task's vocabulary: {''.join(bad)!r}")
    return value


def read_responses(path: str | Path) -> list[ResponseRow]:
    """All rows, validated; the first malformed line stops the read with its line number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFileError(f"responses file '{path}' does not exist (make one with `kltd make-data`)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFileError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        key = "completion" if isinstance(record, dict) and "completion" in record else "response"
        if not isinstance(record, dict) or "prompt" not in record or key not in record:
            raise DataFileError(f"{path}:{number}: each line needs the keys 'prompt' and 'completion'")
        prompt = _check_text(path, number, "prompt", record["prompt"])
        response = _check_text(path, number, key, record[key])
        try:
            reference = solve(prompt)
        except ValueError as error:
            raise DataFileError(f"{path}:{number}: {error}") from None
        answer = int(reference.rsplit(";", 1)[1])
        rows.append(ResponseRow(Example(prompt, reference, answer), response, str(record.get("source", "dataset"))))
    if not rows:
        raise DataFileError(f"responses file '{path}' has no rows")
    return rows


def examples_from_file(path: str | Path, held_out: list[Example]) -> list[Example]:
    """Training examples whose responses come from a responses file (possibly wrong); prompts of the
    held-out split are left out, so evaluation never sees a prompt the run trained on."""
    held = {e.prompt for e in held_out}
    kept = [Example(r.example.prompt, r.response, r.example.answer) for r in read_responses(path)
            if r.example.prompt not in held]
    if not kept:
        raise DataFileError(f"{path}: every prompt is a held-out prompt; nothing left to train on")
    return kept
