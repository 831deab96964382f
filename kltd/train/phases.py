"""Where a job's wall time goes, phase by phase (metrics.json "phases", read by scripts/bench_default.py)."""

from __future__ import annotations

import time
from contextlib import contextmanager


class Phases:
    """Seconds by phase name; a phase entered twice (the two evaluations) adds up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
