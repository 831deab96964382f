"""One example: what every task, data file and hub dataset is turned into."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str  # the text the model is given (the chat template already applied)
    response: str | None  # the reference response, without its end token; None: prompt-only data
    answer: object = None  # what the answer checker compares a response with (None: nothing to check)
    # where they came from, for `kltd make-data` to write rows that kltd reads back the same way
    raw_prompt: object = None  # the prompt before the chat template (text or messages); None: `prompt`
    answer_text: str | None = None  # the text the answer was read from; None: the response
