"""Where a job's wall time and memory go, phase by phase (metrics.json "phases" and "memory"; scripts/bench_default.py
reads the seconds).

Memory is the peak of this process in each phase: its resident set (CPU RSS) and, on a CUDA device, the allocator's
peak. While a phase is open a background thread reads the RSS every 10 ms (/proc/self/statm, Linux) and keeps the
largest; the kernel's own peak counter is left alone, so `time -v` and getrusage still see the whole run's peak.
Where /proc is missing the figure is the process's peak so far (getrusage), which the record says. Phases may nest
(an evaluation inside training): the peak of the inner one counts for the outer one too.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

MB = 2**20
SAMPLE_EVERY_S = 0.01
_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    """This process's resident set now, or None without /proc."""
    try:
        with open(_STATM, "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


def _peak_so_far_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB on Linux


def _gpu():
    """torch.cuda where this process has used a CUDA device, else None (nothing to measure, nothing initialised)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


class _RssSampler:
    """The largest RSS read since `take()` was last called, read every SAMPLE_EVERY_S on a daemon thread."""

    def __init__(self):
        self.largest = _rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kltd-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            rss = _rss_bytes() or 0
            if rss > self.largest:
                self.largest = rss

    def take(self) -> int:
        """The largest RSS since the last take (the current one included); starts the next interval."""
        now = _rss_bytes() or 0
        largest, self.largest = max(self.largest, now), now
        return largest

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Phases:
    """Seconds and peak memory by phase name; a phase entered twice (the two evaluations) adds up its seconds and
    keeps the larger peak."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, dict[str, int]] = {}  # bytes, by phase: cpu_rss and (on a GPU) gpu_allocated
        self.per_phase = _rss_bytes() is not None  # False: CPU peaks are the process's so far (no /proc)
        self._open: list[str] = []
        self._sampler: _RssSampler | None = None

    @contextmanager
    def __call__(self, name: str, timed: bool = True):
        """Time (unless `timed` is False: a phase whose seconds are counted elsewhere) and measure the block."""
        if self.per_phase and self._sampler is None:
            self._sampler = _RssSampler()
        self._boundary()
        self._open.append(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self._boundary()
            self._open.remove(name)
            if not self._open and self._sampler is not None:  # no thread between phases, nor after the job
                self._sampler.stop()
                self._sampler = None
            if timed:
                self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def _boundary(self) -> None:
        """The peaks since the last boundary count for every open phase; then the next interval starts."""
        gpu = _gpu()
        cpu = self._sampler.take() if self._sampler is not None else _peak_so_far_bytes()
        peak = {"cpu_rss": cpu, **({"gpu_allocated": gpu.max_memory_allocated()} if gpu else {})}
        for name in self._open:
            record = self.peaks.setdefault(name, {})
            for key, value in peak.items():
                record[key] = max(record.get(key, 0), value)
        if gpu:
            gpu.reset_peak_memory_stats()

    def memory(self) -> dict:
        """What metrics.json keeps: each phase's peaks in MB, and how the CPU peak was measured."""
        return {"peak_mb": {name: {key: round(value / MB, 1) for key, value in peaks.items()}
                            for name, peaks in self.peaks.items()},
                "cpu_rss": "per phase" if self.per_phase else "since the process started"}
