"""Writing files so that a file (or directory) that exists under its final name is always complete, and
claiming a directory for one process.

Everything kltd leaves on disk for later (summaries, teacher caches, datasets, checkpoints) is written
next to its final name and renamed into place; a crash leaves a temporary behind, never a half-written
file under the real name. Used by every layer; imports nothing of kltd.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary(path: Path) -> Path:
    # the process id keeps two writers of the same file from sharing a temporary
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) to produce the file at a temporary path, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, payload: dict) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def atomic_write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object per line."""
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_dir) to fill a fresh temporary directory, then put it in place of `path`."""
    path = Path(path)
    tmp = _temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


class DirectoryBusy(RuntimeError):
    """Another live process holds the directory."""


LOCK_FILE = ".lock"


def directory_holder(directory: str | Path) -> str | None:
    """Who holds `directory` (see exclusive_claim) if a live process does; None if it is free."""
    import fcntl

    path = Path(directory) / LOCK_FILE
    if not path.is_file():
        return None
    with path.open("a+") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            return handle.read().strip() or "another process"
        fcntl.lockf(handle, fcntl.LOCK_UN)
    return None


@contextmanager
def exclusive_claim(directory: str | Path) -> Iterator[None]:
    """Hold `directory` for this process: a second claim, by any live process, fails with DirectoryBusy.

    A POSIX record lock on directory/.lock: the system releases it when the holder exits, however it exits
    (a kill -9 included), so a rerun after a crash or a requeue takes the directory back at once.
    """
    import fcntl

    path = Path(directory) / LOCK_FILE
    handle = path.open("a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise DirectoryBusy(f"{directory} is in use by a live run ({holder}); give this run another "
                            "hydra.run.dir") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock
