"""Rows of a dataset in the formats TRL names, or in named columns, turned into prompt, response, answer.

- standard:        {"prompt": str, "completion": str}
- conversational:  {"messages": [{"role", "content"}, ...]} (the last assistant message is the response),
                   or {"prompt": [messages], "completion": [messages]}
- named columns:   data.fields.prompt / .response / .answer, e.g. GSM8K's question / answer

A row that does not fit its format is a DataError naming where it came from and the row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class DataError(ValueError):
    """Bad data (a file, a split, a row); the message names it. Reported as one line."""


@dataclass(frozen=True)
class Row:
    prompt: str | list  # plain text, or a list of {"role", "content"} messages
    response: str | None  # None: a prompt-only row
    answer: str | None  # the answer field's text; None: the checker reads the response


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be text, got {type(value).__name__}")
    return value


def _messages(value, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}: '{key}' must be a list of messages with text 'role' and 'content'")
    return value


def _assistant_text(messages: list[dict]) -> str | None:
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return "".join(replies) if replies else None


def describe_format(columns: list[str], prompt_field: str | None) -> str:
    if prompt_field:
        return "named columns"
    if "messages" in columns:
        return "conversational (messages)"
    if "prompt" in columns:
        return "standard or conversational (prompt + completion)"
    raise DataError(f"rows have the columns {', '.join(columns) or '(none)'}, in neither of TRL's formats "
                    "(prompt + completion, or messages); name the columns with data.fields.prompt and "
                    "data.fields.response (e.g. data.fields.prompt=question data.fields.response=answer)")


def row_reader(columns: list[str], fields) -> Callable[[dict, str], Row]:
    """A function reading one row (a dict) of a dataset with these columns; `where` names the row in errors."""
    describe_format(columns, fields.prompt)
    for key in (fields.prompt, fields.response, fields.answer):
        if key is not None and key not in columns:
            raise DataError(f"no column '{key}' (data.fields); the rows have: {', '.join(columns)}")
    answer_key = fields.answer
    if answer_key is None and not fields.prompt and "answer" in columns:
        answer_key = "answer"  # TRL's formats plus an answer column (what `kltd make-data` writes)

    def answer(row: dict, where: str) -> str | None:
        return None if answer_key is None else str(row[answer_key])

    if fields.prompt:
        def read(row: dict, where: str) -> Row:
            prompt = row[fields.prompt]
            prompt = _messages(prompt, where, fields.prompt) if isinstance(prompt, list) else \
                _text(prompt, where, fields.prompt)
            response = None if fields.response is None else _text(row[fields.response], where, fields.response)
            return Row(prompt, response, answer(row, where))
    elif "messages" in columns:
        def read(row: dict, where: str) -> Row:
            messages = _messages(row["messages"], where, "messages")
            if messages and messages[-1]["role"] == "assistant":
                return Row(messages[:-1], messages[-1]["content"], answer(row, where))
            return Row(messages, None, answer(row, where))
    else:
        has_completion = "completion" in columns

        def read(row: dict, where: str) -> Row:
            prompt, completion = row["prompt"], row.get("completion") if has_completion else None
            if isinstance(prompt, list):
                prompt = _messages(prompt, where, "prompt")
                response = None if completion is None else _assistant_text(_messages(completion, where, "completion"))
            else:
                prompt = _text(prompt, where, "prompt")
                response = None if completion is None else _text(completion, where, "completion")
            return Row(prompt, response, answer(row, where))
    return read
