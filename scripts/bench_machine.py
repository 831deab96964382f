"""The machine behind a run of scripts/bench_vs_trl.py: what it is, and how fast it multiplies matrices now.

machine_line names the CPU, its core count and the versions of torch (with its thread count), transformers,
TRL and Python; matmul_gflops is the best fp32 GEMM rate torch reaches in a short burst, measured at the
start and end of an invocation, so that the report can give the runs' model FLOP/s as a fraction of what
the machine did at the time (other work on the machine lowers both).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def matmul_gflops(n: int = 1024, seconds: float = 1.5) -> float:
    """Best observed fp32 GEMM rate (all of torch's threads), GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best / 1e9


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    import torch
    import transformers
    import trl

    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, trl {trl.__version__}, python {platform.python_version()}")
