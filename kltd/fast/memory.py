"""Keep freed memory in the process for reuse (glibc malloc on Linux).

A training step allocates and frees the same few-megabyte tensors over and over. By default glibc serves
such blocks with fresh mmap calls or returns the freed top of the heap to the system, so the next step
touches new pages and pays a page fault per 4 KB: on the toy pair that was 15% of a step (104 -> 88 ms
per OPD step, scripts/bench_vs_trl.py). Serving every block under 32 MB from the heap and never trimming
it removes those faults; the cost is that the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit on 64-bit systems
_done = False


def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process; False where it does not apply (not Linux, not glibc)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
