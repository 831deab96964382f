"""Where a job's wall time and memory go, phase by phase (metrics.json "phases" and "memory"; scripts/bench_default.py
reads the seconds).

Memory is the peak of this process in each phase: its resident set (CPU RSS, every process has one) and, on a CUDA
device, the allocator's peak. On Linux the kernel's peak-RSS counter (VmHWM) is reset at every phase boundary
(/proc/self/clear_refs), so a phase's figure is its own peak, not the process's so far; where that cannot be done the
figure is the peak since the process started (resource.getrusage), which the record says. Phases may nest (an
evaluation inside training): at each boundary the peak since the last one counts for every phase then open.
"""

from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

MB = 2**20


def _cpu_peak_bytes() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        found = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.M)
        if found:
            return int(found.group(1)) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB on Linux


def _reset_cpu_peak() -> bool:
    """Start the kernel's peak-RSS counter again from the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _gpu():
    """torch.cuda where this process has used a CUDA device, else None (nothing to measure, nothing initialised)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


class Phases:
    """Seconds and peak memory by phase name; a phase entered twice (the two evaluations) adds up its seconds and
    keeps the larger peak."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, dict[str, int]] = {}  # bytes, by phase: cpu_rss and (on a GPU) gpu_allocated
        self.per_phase = True  # False: CPU peaks are since the process started (no per-phase reset here)
        self._open: list[str] = []

    @contextmanager
    def __call__(self, name: str, timed: bool = True):
        """Time (unless `timed` is False: a phase whose seconds are counted elsewhere) and measure the block."""
        self._boundary()
        self._open.append(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self._boundary()
            self._open.remove(name)
            if timed:
                self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def _boundary(self) -> None:
        """The peaks since the last boundary count for every open phase; then the counters start again."""
        gpu = _gpu()
        peak = {"cpu_rss": _cpu_peak_bytes(), **({"gpu_allocated": gpu.max_memory_allocated()} if gpu else {})}
        for name in self._open:
            record = self.peaks.setdefault(name, {})
            for key, value in peak.items():
                record[key] = max(record.get(key, 0), value)
        self.per_phase = _reset_cpu_peak() and self.per_phase
        if gpu:
            gpu.reset_peak_memory_stats()

    def memory(self) -> dict:
        """What metrics.json keeps: each phase's peaks in MB, and how the CPU peak was measured."""
        return {"peak_mb": {name: {key: round(value / MB, 1) for key, value in peaks.items()}
                            for name, peaks in self.peaks.items()},
                "cpu_rss": "per phase" if self.per_phase else "since the process started"}
