"""The rows of a data file or hub dataset, read and checked: the one place where a row is refused or dropped.

A row is bad when it does not fit its format, its prompt or response is empty, or the answer checker cannot
read its reference answer. data.bad_rows=error (the default) stops at the first one, named by its place in
the source (kltd.data.sources.RowNames); data.bad_rows=drop leaves bad rows out and counts them by reason.

The checks need no tokenizer: `kltd train` runs them before Hydra creates a directory or any model loads
(`check_rows`, from kltd.train.preflight), and prepare() builds the run's examples from the same checked
rows (`take`). Rows are checked lazily, in order, only as far as a caller takes them: data.n_train=1000 of
a large dataset checks about 1000 rows, not all of them.

Checked rows are kept for the process (`checked_rows`), because one command reads the same data several
times (preflight for each job of a sweep in the command's process, then again in the job, then prepare())
and a check can be slow: math-verify reads a MATH solution in 4 to 7 ms on an idle CPU core, 17 to 50 ms on
a busy one (data.checker=boxed), so the 7,500 rows of MATH cost 30 s or more each time. The key is what
decides the verdicts: the source (a file's size and modification time included), the splits, the fields
and the checker. data.bad_rows is not in it: each row's verdict is kept, and `take` applies the policy.
A row that prepare() reads beyond what preflight took (rows over the token limits make it read on) is
checked then, still before any model loads.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kltd.data.checkers import Checker, get_checker
from kltd.data.formats import BadRow, DataError, Row, describe_format, row_reader
from kltd.data.sources import RowNames, Splits, choose_splits, load

READING_CHECKERS = ("gsm8k", "boxed", "exact")  # checkers that read a reference answer from text
MEMO_SIZE = 8  # sources kept per process (a sweep over a few data.path values)


@dataclass(frozen=True)
class GoodRow:
    row: Row
    answer: object  # the checker's reference answer; None without a checker
    answer_text: str | None  # the text the answer is read from: the answer field, else the response


@dataclass(frozen=True)
class Rejected:
    position: int  # the row's place in its part (train or eval), from 0
    problem: BadRow


class CheckedPart:
    """The rows of one part (training or held-out), checked in order as far as they are taken, each once."""

    def __init__(self, rows, check: Callable[[dict], GoodRow]):
        self._size, self._source, self._check = len(rows), iter(rows), check
        self._verdicts: list[GoodRow | Rejected] = []

    def __iter__(self) -> Iterator[GoodRow | Rejected]:
        for position in range(self._size):
            if position == len(self._verdicts):
                self._verdicts.append(self._verdict(position, next(self._source)))
            yield self._verdicts[position]

    def _verdict(self, position: int, raw: dict) -> GoodRow | Rejected:
        try:
            return self._check(raw)
        except BadRow as problem:
            return Rejected(position, problem)


@dataclass
class CheckedRows:
    splits: Splits
    format: str
    names: RowNames
    parts: dict[str, CheckedPart]  # "train" and "eval"

    def place(self, part: str, position: int) -> str:
        """The name of the `position`-th row of `part`: its place in the source, not in the part."""
        return self.names(*self.splits.origin(part, position))

    def label(self, part: str) -> str:
        return self.splits.train_name if part == "train" else self.splits.eval_name


def _checker_fix(checker: Checker) -> str:
    """Another checker may read what this one cannot (a MATH answer under gsm8k); exact reads any text."""
    if checker.name not in ("gsm8k", "boxed"):
        return "fix or remove the row"
    return "try " + " or ".join(f"data.checker={name}" for name in READING_CHECKERS if name != checker.name)


def row_checker(read: Callable[[dict], Row], checker: Checker | None) -> Callable[[dict], GoodRow]:
    """Read a row and its reference answer; BadRow for a row that does not fit or whose answer is unreadable."""

    def check(raw: dict) -> GoodRow:
        row = read(raw)
        text = row.answer if row.answer is not None else row.response
        if checker is None:
            return GoodRow(row, None, text)
        if text is None:
            raise BadRow(f"data.checker={checker.name} needs a reference answer, and the row has neither a response "
                         "nor an answer field", "no reference answer",
                         "name the answer column with data.fields.answer, or set data.checker=none")
        try:
            return GoodRow(row, checker.reference(text), text)
        except ValueError as error:
            raise BadRow(str(error), checker.unreadable, _checker_fix(checker)) from None

    return check


def _read_and_check(cfg) -> CheckedRows:
    splits = choose_splits(*load(cfg), cfg)
    columns = list(splits.train.column_names)
    check = row_checker(row_reader(columns, cfg.fields), get_checker(cfg.checker_name))
    names = RowNames(splits.where, Path(cfg.path).expanduser() if cfg.source == "file" else None)
    return CheckedRows(splits, describe_format(columns, cfg.fields.prompt), names,
                       {"train": CheckedPart(splits.train, check), "eval": CheckedPart(splits.eval, check)})


def _fingerprint(cfg) -> tuple:
    """What identifies a source's contents: a hub name, or a file's (or a directory's files') size and mtime."""
    if cfg.source != "file":
        return (cfg.path, cfg.name)
    path = Path(cfg.path).expanduser().resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return (str(path), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()))


def _memo_key(cfg) -> tuple:
    held_out = (cfg.eval_fraction, cfg.seed) if cfg.eval_split is None else None  # what picks the held-out rows
    f = cfg.fields
    return (cfg.source, _fingerprint(cfg), cfg.train_split, cfg.eval_split, held_out, f.prompt, f.response, f.answer,
            cfg.checker_name)


_MEMO: OrderedDict[tuple, CheckedRows] = OrderedDict()


def checked_rows(cfg) -> CheckedRows:
    """The rows of data=file or data=hub, loaded once per process and source and checked as far as taken."""
    key = _memo_key(cfg)
    if key not in _MEMO:
        _MEMO[key] = _read_and_check(cfg)
        while len(_MEMO) > MEMO_SIZE:
            _MEMO.popitem(last=False)
    _MEMO.move_to_end(key)
    return _MEMO[key]


def describe_bad_rows(counts: dict[str, int]) -> str:
    """'no number in the answer: 191, empty prompt: 2' (most common first)."""
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items(), key=lambda item: -item[1]))


@dataclass
class Taken:
    kept: list  # what `keep` made of the good rows
    bad: Counter  # the bad rows dropped, by reason


def take(rows: CheckedRows, part: str, limit: int, bad_rows: str, keep: Callable[[GoodRow], object]) -> Taken:
    """The first `limit` good rows of `part` that `keep` keeps (it returns None to leave one out, e.g. a row over
    the token limits). A bad row ends the read with one line naming it (data.bad_rows=error), or is counted
    and left out (drop); a part whose every row is bad is refused either way."""
    kept, bad, good = [], Counter(), 0
    for verdict in rows.parts[part]:
        if len(kept) >= limit:
            break
        if isinstance(verdict, Rejected):
            if bad_rows == "error":
                problem = verdict.problem
                raise DataError(f"{rows.place(part, verdict.position)}: {problem}; {problem.fix}, or set "
                                "data.bad_rows=drop to drop and count such rows")
            bad[verdict.problem.reason] += 1
            continue
        good += 1
        example = keep(verdict)
        if example is not None:
            kept.append(example)
    if bad and not good:
        raise DataError(f"{rows.splits.where}: every row of the {rows.label(part)} split is bad "
                        f"({describe_bad_rows(bad)}); nothing is left to use (data.bad_rows=error names the first)")
    return Taken(kept, bad)


def prompt_only_problem(where: str) -> str:
    return (f"{where} has prompt-only rows, but these states are the dataset's responses; use prefix=student or "
            "prefix=teacher, or data with responses")


def check_rows(cfg, needs_responses: bool = False) -> None:
    """Every check of data=file or data=hub rows that needs no tokenizer (format, empty fields, reference answers,
    data.bad_rows, prompt-only rows where the states are the responses: `needs_responses`), on the rows a run
    would take; DataError with one line for the first problem."""
    rows = checked_rows(cfg)
    train = take(rows, "train", cfg.n_train, cfg.bad_rows, keep=lambda good: good)
    take(rows, "eval", cfg.n_eval, cfg.bad_rows, keep=lambda good: good)
    if needs_responses and any(good.row.response is None for good in train.kept):
        raise DataError(prompt_only_problem(rows.splits.where))
