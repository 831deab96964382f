"""Datasets of responses on disk (JSONL): what `kltd make-data` writes and prefix=fixed can train on.

One JSON object per line: {"prompt": "12+45=", "response": "57;57", "source": "student"}. Responses may be
wrong: offline RL learns from imperfect data. Prompts must be task prompts; the reference answer is
recomputed from the prompt, never trusted from the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kltd.data.addition import CHARACTERS, Example, solve
from kltd.files import atomic_write_text


class DataFileError(ValueError):
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
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFileError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or "prompt" not in record or "response" not in record:
            raise DataFileError(f"{path}:{number}: each line needs the keys 'prompt' and 'response'")
        prompt = _check_text(path, number, "prompt", record["prompt"])
        response = _check_text(path, number, "response", record["response"])
        try:
            reference = solve(prompt)
        except ValueError as error:
            raise DataFileError(f"{path}:{number}: {error}") from None
        answer = int(reference.rsplit(";", 1)[1])
        rows.append(ResponseRow(Example(prompt, reference, answer), response, str(record.get("source", "dataset"))))
    if not rows:
        raise DataFileError(f"responses file '{path}' has no rows")
    return rows


def write_responses(path: str | Path, rows: list[ResponseRow]) -> None:
    """Atomic (kltd.files): a file that exists is complete."""
    lines = [json.dumps({"prompt": row.example.prompt, "response": row.response, "source": row.source}) + "\n"
             for row in rows]
    atomic_write_text(Path(path).expanduser(), "".join(lines))
