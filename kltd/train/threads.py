"""CPU threads for one job, restored when the job ends.

PyTorch's thread count is process-wide. A job sets it for itself (trainer.num_threads) and puts back what
it found, so a later job of a one-process sweep starts from the process's own default, never from a count
an earlier job chose.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Below this size (the larger of the two models) a second thread only adds synchronisation: on a busy
# 2-core machine PyTorch's default of two threads made a toy teacher-prefix step 60x slower.
SMALL_MODEL_PARAMETERS = 20_000_000


def share_of_cores(processes: int) -> int:
    """CPU threads for one of `processes` processes that run side by side on this machine (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def threads_for(requested: int, device: torch.device, models) -> int:
    """trainer.num_threads resolved: 0 means one thread for small models on the CPU, else the current count."""
    if device.type != "cpu" or requested > 0:
        return requested if requested > 0 else torch.get_num_threads()
    size = max(sum(p.numel() for p in m.parameters()) for m in models if m is not None)  # None: a served teacher
    return 1 if size < SMALL_MODEL_PARAMETERS else torch.get_num_threads()


@contextmanager
def job_threads(count: int) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)
