"""SIGTERM and SIGINT during training: finish the step, save a checkpoint, stop cleanly.

A cluster that preempts a job sends SIGTERM (SLURM: some time before the kill); Ctrl-C sends SIGINT. Either
sets a flag that the training loop reads after each step; the loop then saves a checkpoint, records
status "interrupted" and raises Interrupted, which the command turns into one line and exit code
128 + the signal (143 for SIGTERM, 130 for SIGINT). Rerunning the same command resumes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} after step {step}; checkpoint saved in {checkpoint}; rerun the "
                         "same command (or kltd train resume=RUN_DIR) to continue")

    def __reduce__(self):  # rebuilt from its fields when it crosses processes (kltd.train.data_parallel)
        return Interrupted, (self.signum, self.step, self.checkpoint)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalFlag:
    signum: int | None = None


@contextmanager
def stop_requests() -> Iterator[SignalFlag]:
    """A flag that SIGTERM / SIGINT set while the block runs (main thread only); the old handlers come back."""
    flag = SignalFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        if flag.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
