"""Settings that belong to the whole process, applied once by the entry point (never by a job).

Only the app layer calls this (the command, and the task function in the worker processes of a parallel
launcher): a job of a one-process sweep must not change what the next job finds. CPU threads are per job
instead (kltd.train.threads), set and restored by each.
"""

from __future__ import annotations

from kltd.fast.memory import keep_freed_memory


def configure_process(keep_freed: bool) -> None:
    """trainer.keep_freed_memory: glibc keeps freed blocks for reuse (kltd.fast.memory); process-wide, once."""
    if keep_freed:
        keep_freed_memory()
