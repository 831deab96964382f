"""Rows of a dataset in the formats TRL names, or in named columns, turned into prompt, response, answer.

- standard:        {"prompt": str, "completion": str}
- conversational:  {"messages": [{"role", "content"}, ...]} (the last assistant message is the response),
                   or {"prompt": [messages], "completion": [messages]}
- named columns:   data.fields.prompt / .response / .answer, e.g. GSM8K's question / answer

A row that does not fit its format, or whose prompt or response is empty, is a BadRow; kltd.data.rows names
it by its place in the file and refuses or drops it (data.bad_rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class DataError(ValueError):
    """Bad data (a file, a split, a row); the message names it. Reported as one line."""


class BadRow(DataError):
    """One row that does not fit. The message says what is wrong with it (the caller names the row); `reason`
    is its kind, what data.bad_rows=drop counts; `fix` says how to repair it."""

    def __init__(self, problem: str, reason: str, fix: str = "fix or remove the row"):
        super().__init__(problem)
        self.reason, self.fix = reason, fix


@dataclass(frozen=True)
class Row:
    prompt: str | list  # plain text, or a list of {"role", "content"} messages
    response: str | None  # None: a prompt-only row
    answer: str | None  # the answer field's text; None: the checker reads the response


def _text(value, key: str, role: str) -> str:
    if value is None:  # a missing key, or an empty CSV cell
        raise BadRow(f"empty {role} ('{key}' has no value)", f"empty {role}")
    if not isinstance(value, str):
        raise BadRow(f"'{key}' must be text, got {type(value).__name__}", f"'{key}' not text")
    return value


def _messages(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in value):
        raise BadRow(f"'{key}' must be a list of messages with text 'role' and 'content'",
                     f"'{key}' not a list of messages")
    return value


def _assistant_text(messages: list[dict]) -> str:
    """The completion's assistant turns ("" when it has none: an empty response, not a prompt-only row)."""
    return "".join(m["content"] for m in messages if m["role"] == "assistant")


def _blank(text: str) -> bool:
    return not text.strip()


def refuse_empty(row: Row) -> Row:
    """An empty prompt would leave a model nothing to continue (and break the batch layout further on); an
    empty response would supervise the end token alone. A conversation's prompt is empty when no user or
    system turn says anything."""
    if isinstance(row.prompt, str):
        empty_prompt = _blank(row.prompt)
    else:
        empty_prompt = not any(m["role"] in ("user", "system") and not _blank(m["content"]) for m in row.prompt)
    if empty_prompt:
        raise BadRow("empty prompt", "empty prompt")
    if row.response is not None and _blank(row.response):
        raise BadRow("empty response", "empty response")
    return row


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


def row_reader(columns: list[str], fields) -> Callable[[dict], Row]:
    """A function reading one row (a dict) of a dataset with these columns; it raises BadRow for a row that
    does not fit or has an empty prompt or response."""
    describe_format(columns, fields.prompt)
    for key in (fields.prompt, fields.response, fields.answer):
        if key is not None and key not in columns:
            raise DataError(f"no column '{key}' (data.fields); the rows have: {', '.join(columns)}")
    answer_key = fields.answer
    if answer_key is None and not fields.prompt and "answer" in columns:
        answer_key = "answer"  # TRL's formats plus an answer column (what `kltd make-data` writes)

    def answer(row: dict) -> str | None:
        return None if answer_key is None else str(row[answer_key])

    if fields.prompt:
        def read(row: dict) -> Row:
            prompt = row[fields.prompt]
            prompt = (_messages(prompt, fields.prompt) if isinstance(prompt, list)
                      else _text(prompt, fields.prompt, "prompt"))
            response = None if fields.response is None else _text(row[fields.response], fields.response, "response")
            return Row(prompt, response, answer(row))
    elif "messages" in columns:
        def read(row: dict) -> Row:
            messages = _messages(row["messages"], "messages")
            if messages and messages[-1]["role"] == "assistant":
                return Row(messages[:-1], messages[-1]["content"], answer(row))
            return Row(messages, None, answer(row))
    else:
        # without a completion column the rows are prompts only; with one, a row's missing completion (an
        # empty CSV cell reads as one) is an empty response
        has_completion = "completion" in columns

        def read(row: dict) -> Row:
            prompt, completion = row["prompt"], row["completion"] if has_completion else None
            if isinstance(prompt, list):
                prompt = _messages(prompt, "prompt")
                response = None if not has_completion else _assistant_text(_messages(completion or [], "completion"))
            else:
                prompt = _text(prompt, "prompt", "prompt")
                response = None if not has_completion else _text(completion, "completion", "response")
            return Row(prompt, response, answer(row))
    return lambda row: refuse_empty(read(row))
