"""Time the default `kltd train` run (and optionally other cells) end to end on this machine.

    python scripts/bench_default.py                       # the Quickstart run
    python scripts/bench_default.py --cells fixed:expert fixed:student student:expert student:student

Prints, per cell: total wall time (model loading, both evaluations and the checkpoint included), the
training-loop time, and training steps per second, read from the run's metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only, {os.cpu_count()} cores"
    return f"{cpu}; {device}; torch {torch.__version__} ({torch.get_num_threads()} threads)"


def run_cell(prefix: str, trajectory: str, extra: list[str], workdir: Path) -> dict:
    run_dir = workdir / f"{prefix}-{trajectory}"
    cmd = [sys.executable, "-m", "kltd.app.cli", "train", f"prefix={prefix}", f"trajectory={trajectory}",
           "trainer.progress=false", f"hydra.run.dir={run_dir}", *extra]
    subprocess.run(cmd, check=True, cwd=workdir, env={**os.environ, "WANDB_MODE": "disabled"},
                   stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="*", default=["fixed:expert"], help="prefix:trajectory pairs")
    parser.add_argument("overrides", nargs="*", help="extra kltd train overrides")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        for cell in args.cells:
            prefix, trajectory = cell.split(":")
            s = run_cell(prefix, trajectory, args.overrides, Path(tmp))
            print(f"{s['method']:<20} wall {s['wall_time_s']:6.1f} s  train loop {s['train_time_s']:6.1f} s  "
                  f"{s['steps']} steps  {s['steps_per_s']:.2f} steps/s  "
                  f"accuracy {s['eval_before']['accuracy']:.3f} -> {s['eval_after']['accuracy']:.3f}")


if __name__ == "__main__":
    main()
