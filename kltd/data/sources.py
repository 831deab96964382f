"""Datasets from local files and the hub, through `datasets`, and the choice of training and held-out
splits.

data=file reads a JSONL, JSON, Parquet or CSV file, or a directory written by Dataset.save_to_disk or
DatasetDict.save_to_disk; data=hub loads a hub dataset (offline from the local cache). Splits are
data.train_split and data.eval_split; without an eval split a seeded fraction of the training split is
held out (data.eval_fraction), disjoint from training.
"""

from __future__ import annotations

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
        return datasets.load_dataset(builder, data_files={"train": str(path)})
    except Exception as error:  # the readers' own errors say little about where; name the file
        raise DataError(f"{path}: cannot be read as {path.suffix.lstrip('.')} ({_short(error)})") from None


def _check_text_file(path: Path, builder: str) -> None:
    if builder == "parquet":
        return
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if builder == "json" and path.suffix.lower() == ".jsonl" and line.strip():
                    import json

                    try:
                        json.loads(line)
                    except ValueError as error:
                        raise DataError(f"{path}:{number}: not valid JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None


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
    cache_only_when_offline()
    import datasets

    try:
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
                  f"{cfg.train_split} (held out)", held_out)
