"""scripts/bench_optimizer.py: both forms run in fresh processes and the last line carries the ratio and peaks."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_optimizer  # noqa: E402


def test_a_quick_round_prints_the_machine_readable_line(capsys):
    bench_optimizer.main(["--quick", "--rounds", "1", "--steps", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = dict(item.split("=") for item in last.split())
    assert set(figures) == {"optimizer_time_ratio", "optimizer_peak_default_mb", "optimizer_peak_fused_mb"}
    assert float(figures["optimizer_time_ratio"]) > 0
    assert all(re.fullmatch(r"-?\d+", figures[k]) for k in ("optimizer_peak_default_mb", "optimizer_peak_fused_mb"))
