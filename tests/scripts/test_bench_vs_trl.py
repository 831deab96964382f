"""Smoke test of scripts/bench_vs_trl.py: tiny models, one round, both scales; checks the output contract."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_vs_trl.py"
LAST_LINE = re.compile(
    r"ratio_opd=(?P<opd>\d+\.\d+) ratio_fixed=(?P<fixed>\d+\.\d+) ratio_mem=(?P<mem>\d+\.\d+) "
    r"parity=(?P<parity>ok|fail)"
)


def test_quick_benchmark_prints_the_summary_line_and_parity_holds():
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--scales", "toy,32k"], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    assert match["parity"] == "ok", "\n".join(line for line in lines if "rel " in line)
    for key in ("opd", "fixed", "mem"):
        assert float(match[key]) > 0
    # the table names every compared setup at both scales
    out = proc.stdout
    for setup in ("DistillationTrainer beta=1 (GC on", "GKDTrainer lmbda=1 beta=1 (GC off)", "GKDTrainer lmbda=0"):
        assert out.count(setup) >= 2, setup
    assert "GFLOP/s" in out
