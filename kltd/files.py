"""Writing files so that a file (or directory) that exists under its final name is always complete, and
claiming a directory for one process.

Everything kltd leaves on disk for later (summaries, teacher caches, datasets, checkpoints) is written
next to its final name and renamed into place; a crash leaves a temporary behind, never a half-written
file under the real name, and a later run in the directory removes the temporaries of writers that are gone
(remove_stale_temporaries). A full disk is a DiskFull naming the file. Used by every layer; imports nothing
of kltd.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class DiskFull(RuntimeError):
    """No space left on the device (or the disk quota reached) while writing `path`: one line for the user.

    `resume_from`: the checkpoint a rerun of the same command resumes from, when the caller knows it.
    """

    def __init__(self, path: str | Path, resume_from: str | Path | None = None):
        self.path, self.resume_from = str(path), None if resume_from is None else str(resume_from)
        then = f" to resume from {self.resume_from}" if self.resume_from else ""
        super().__init__(f"no space left on device while writing {self.path}; free space and rerun the same "
                         f"command{then}")

    def __reduce__(self):  # rebuilt from its fields when it crosses processes (kltd.train.data_parallel)
        return DiskFull, (self.path, self.resume_from)


# How writers say it when it is not an OSError: safetensors "...: No space left on device (os error 28)"; torch's
# zip writer says only "unexpected pos ..." (then the file system itself tells: nothing left on it)
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
_NEARLY_FULL_BYTES = 1 << 20


def disk_full(error: BaseException, where: str | Path | None = None) -> bool:
    """Whether `error` (or an error it was raised from) comes from a full device or a full disk quota. `where`:
    a directory the failed write was in; if its file system has (next to) nothing left, a writer that does
    not say why it failed (torch.save) failed for lack of space."""
    seen, chain = error, []
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for link in chain:
        if isinstance(link, DiskFull):
            return True
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(link) for words in _FULL_WORDS):
            return True
    if where is None:
        return False
    try:
        stats = os.statvfs(where)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def _temporary(path: Path) -> Path:
    # the process id keeps two writers of the same file from sharing a temporary, and tells a later run whether
    # the writer of a temporary left behind is still alive (remove_stale_temporaries)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporaries in `directory` (not below it) whose writing process is gone (a kill -9 in the
    middle of a write leaves one: `.step-000050.tmp1234`, up to a whole checkpoint). The writer's process id is
    in the name; a live writer's temporary is never touched (same host assumed: run directories are not
    written from two machines at once). Returns what was removed."""
    directory = Path(directory)
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:  # no such directory yet
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) to produce the file at a temporary path, then rename it to `path`. A full disk raises
    DiskFull (the temporary removed, whatever stood at `path` before untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as error:
        if disk_full(error, path.parent):  # asked before the temporary goes, while it still fills the disk
            raise DiskFull(path) from error
        raise
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
    """Call write(tmp_dir) to fill a fresh temporary directory, then put it in place of `path`. A full disk
    raises DiskFull (the temporary removed, whatever stood at `path` before untouched)."""
    path = Path(path)
    tmp = _temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except Exception as error:
        if disk_full(error, path.parent):  # asked before the temporary goes, while it still fills the disk
            raise DiskFull(path) from error
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def directory_problem(path: str | Path) -> str | None:
    """Why a directory could not be created (where missing) and written at `path`; None: it can.

    Found by trying, not by asking os.access: as root os.access says yes for /proc, /sys and the like, where
    nothing can be created. A uniquely named directory is made and removed in the nearest existing directory
    on the way (in `path` itself if it exists); `path` itself is not created, so two commands starting at
    once cannot see each other's probe.
    """
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: nothing can be made through it
            return f"'{path}' cannot be created: '{probe}' is a broken link"
        probe = probe.parent
    if not probe.is_dir():
        return f"'{path}' cannot be a directory: '{probe}' is a file"
    trial = probe / f".kltd-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        trial.mkdir()
    except OSError as error:
        return f"'{path}' cannot be {'written' if probe == path else 'created'}: '{probe}' takes no new " \
               f"directories ({error.strerror or type(error).__name__})"
    try:
        trial.rmdir()
    except OSError:
        pass
    return None


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
