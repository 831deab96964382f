"""Datasets from local files and the hub, through `datasets`, and the choice of training and held-out
splits.

data=file reads a JSONL, JSON, Parquet or CSV file, or a directory written by Dataset.save_to_disk or
DatasetDict.save_to_disk; data=hub loads a hub dataset (offline from the local cache). Splits are
data.train_split and data.eval_split; without an eval split a seeded fraction of the training split is
held out (data.eval_fraction), disjoint from training. A row is named by its place in the source (RowNames),
whichever split it ends up in.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from kltd.data.formats import DataError
from kltd.hub import cache_only_when_offline, hub_reachable, why_offline

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Splits:
    train: object  # a datasets.Dataset
    eval: object
    where: str  # names the data in messages: a file or a hub name
    train_name: str
    eval_name: str  # the eval split, or "<train split> (held out)"
    held_out: list[int] | None = None  # rows of the training split held out for evaluation
    kept: list[int] | None = None  # rows of the training split left for training (None: all of them)

    def origin(self, part: str, position: int) -> tuple[str, int]:
        """(the source's split, the row's index there) of the `position`-th row of `part` ("train" or "eval")."""
        if part == "train":
            return self.train_name, position if self.kept is None else self.kept[position]
        if self.held_out is not None:
            return self.train_name, self.held_out[position]
        return self.eval_name, position


def _load_file(path: Path):
    import datasets

    if path.is_dir():
        if not any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json", "dataset_info.json")):
            raise DataError(f"data.path '{path}' is a directory but not one written by save_to_disk")
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    builder = FILE_TYPES.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"data.path '{path}': unknown file type '{path.suffix}'; use one of "
                        f"{', '.join(FILE_TYPES)} or a save_to_disk directory")
    _check_text_file(path, builder)
    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)}, **_as_text(path, builder))
    except Exception as error:  # the readers' own errors say little about where; name the file
        raise DataError(f"{path}: cannot be read as {path.suffix.lstrip('.')} ({_short(error)})") from None


def _as_text(path: Path, builder: str) -> dict:
    """Every CSV cell is text: without this pandas reads a column of answers such as 2 and 3.50 as the
    numbers 2.0 and 3.5."""
    if builder != "csv":
        return {}
    import datasets

    with path.open(encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
    if not header or len(set(header)) < len(header):
        return {}  # pandas renames repeated names: leave the reading to it
    return {"features": datasets.Features({name: datasets.Value("string") for name in header})}


_KINDS = {str: "text", int: "a number", float: "a number", bool: "true or false", list: "a list", dict: "an object"}


def _check_text_file(path: Path, builder: str) -> None:
    if builder == "parquet":
        return
    kinds: dict[str, dict[str, list[int]]] = {}  # JSON Lines: key -> kind of value -> the lines that hold it
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if builder == "json" and path.suffix.lower() == ".jsonl" and line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError as error:
                        raise DataError(f"{path}:{number}: not valid JSON ({error})") from None
                    for key, value in (record.items() if isinstance(record, dict) else ()):
                        if value is not None:
                            kinds.setdefault(key, {}).setdefault(_KINDS.get(type(value), "a value"), []).append(number)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    _check_one_kind_per_key(path, kinds)


def _check_one_kind_per_key(path: Path, kinds: dict[str, dict[str, list[int]]]) -> None:
    """A key whose value is text on most lines and, say, a number on one cannot be a column: datasets would
    read it as JSON and hand back every number-like text as a number. Name the first line that differs from
    the most common kind (a file-level refusal: such a file is not read as a table, so no row can be dropped)."""
    for key, lines_of in kinds.items():
        if len(lines_of) < 2:
            continue
        usual = max(lines_of, key=lambda kind: len(lines_of[kind]))
        kind, lines = min(((k, v) for k, v in lines_of.items() if k != usual), key=lambda item: item[1][0])
        raise DataError(f"{path}:{lines[0]}: '{key}' must be {usual} as on the other lines, got {kind}; fix the "
                        "line (a column holds one kind of value, so data.bad_rows=drop cannot drop it)")


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _quiet_datasets() -> None:
    """No progress bars: one line per run says what was loaded."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def load(cfg) -> tuple[object, str]:
    """(DatasetDict, where) for data=file or data=hub."""
    _quiet_datasets()
    if cfg.source == "file":
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise DataError(f"data.path '{path}' does not exist")
        return _load_file(path), str(path)
    import datasets

    try:
        with cache_only_when_offline():
            loaded = datasets.load_dataset(cfg.path, cfg.name)
    except Exception as error:
        offline = "" if hub_reachable() else f" ({why_offline()}: only the local datasets cache was read)"
        raise DataError(f"hub dataset '{cfg.path}'{f' ({cfg.name})' if cfg.name else ''} cannot be loaded{offline}: "
                        f"{_short(error)}") from None
    return (loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded}),
            cfg.path)


def choose_splits(loaded, where: str, cfg) -> Splits:
    names = list(loaded)
    if cfg.train_split not in loaded:
        raise DataError(f"{where} has no split '{cfg.train_split}' (data.train_split); it has: {', '.join(names)}")
    train = loaded[cfg.train_split]
    if cfg.eval_split is not None:
        if cfg.eval_split not in loaded:
            raise DataError(f"{where} has no split '{cfg.eval_split}' (data.eval_split); it has: {', '.join(names)}")
        return Splits(train, loaded[cfg.eval_split], where, cfg.train_split, cfg.eval_split)
    n = len(train)
    held = max(1, math.ceil(cfg.eval_fraction * n))
    if n - held < 1:
        raise DataError(f"{where}: {n} rows are too few to hold out a fraction for evaluation; "
                        "add rows or set data.eval_split")
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    held_out = sorted(order[:held])
    kept = sorted(order[held:])
    return Splits(train.select(kept), train.select(held_out), where, cfg.train_split,
                  f"{cfg.train_split} (held out)", held_out, kept)


class RowNames:
    """A row's name in messages, counted from 1 as an editor or a viewer shows it: `file:line` in a JSON Lines
    or CSV file (blank lines counted, as editors count them; a CSV record by the line it starts on), else
    `where [split] row N` (a JSON array, Parquet, save_to_disk or hub dataset). Line numbers are found only
    when a row is named, by reading the file once more."""

    def __init__(self, where: str, path: Path | None = None):
        self.where, self._path, self._lines, self._read = where, path, None, path is None

    def __call__(self, split: str, index: int) -> str:
        lines = self._line_numbers()
        if lines is not None and index < len(lines):
            return f"{self.where}:{lines[index]}"
        return f"{self.where} [{split}] row {index + 1}"

    def _line_numbers(self) -> list[int] | None:
        if not self._read:
            self._read = True
            self._lines = _record_lines(self._path)
        return self._lines


def _record_lines(path: Path) -> list[int] | None:
    """The line each row of a line-based file starts on (None: rows are not lines)."""
    suffix = path.suffix.lower()
    if path.is_dir() or suffix not in (".jsonl", ".json", ".csv"):
        return None
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:  # the csv module reads line ends itself
            return _csv_record_lines(f)
    with path.open(encoding="utf-8") as f:
        if suffix == ".json" and _one_json_value(f):
            return None  # a JSON array: its rows are not lines
        f.seek(0)
        return [number for number, line in enumerate(f, 1) if line.strip()]  # datasets skips blank lines


def _one_json_value(f) -> bool:
    try:
        json.load(f)
    except ValueError:
        return False  # JSON Lines
    return True


def _csv_record_lines(f) -> list[int]:
    """The csv module's line count, so a quoted field over several lines moves the next record on; blank lines
    hold no record (pandas, which datasets reads CSV with, skips them), the header is the first record."""
    reader, starts, end = csv.reader(f), [], 0
    for record in reader:
        start, end = end + 1, reader.line_num
        if record:
            starts.append(start)
    return starts[1:]
