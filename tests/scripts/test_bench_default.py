"""Smoke test of scripts/bench_default.py: tiny runs, one round, the matrix sweep included; checks the output
contract (the last line, and the sections that lead to it)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_default.py"
TINY = ["trainer.max_steps=2", "trainer.batch_size=4", "eval.num_prompts=4", "eval.batch_size=4", "eval.pass_k=2",
        "data.n_train=64", "data.n_eval=8", "model.device=cpu"]
LAST_LINE = re.compile(r"run_ratio=(?P<run>\S+) sweep_ratio=(?P<sweep>\S+) eval_speedup=(?P<eval>\S+)")
THREE_DECIMALS = re.compile(r"\d+\.\d{3}")


def test_tiny_benchmark_prints_the_three_ratios(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--eval-rounds", "3", *TINY],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    last = out.strip().splitlines()[-1]
    match = LAST_LINE.fullmatch(last)
    assert match, last
    for key in ("run", "sweep", "eval"):
        assert THREE_DECIMALS.fullmatch(match[key]), last
        value = float(match[key])
        assert math.isfinite(value) and value > 0, last
    assert float(match["run"]) > 1  # a run's wall time covers its training and more (one process, one clock)
    # the sweep runs its 9 jobs side by side, min(9, cores) at a time: their summed training can exceed the sweep's
    # wall time up to that many times over (the ratio is printed to 3 decimals)
    assert float(match["sweep"]) >= 1 / min(9, os.cpu_count() or 1) - 5e-4
    # the sections behind the numbers
    assert re.search(r"load average \(1, 5, 15 min\) before: [\d.]+ [\d.]+ [\d.]+; \d+ CPUs", out)
    assert "default run (kltd train: SFT" in out and "sweep=matrix (9 runs" in out
    for phase in ("data", "loading", "evaluation", "training", "rest"):  # the runs' own phases (metrics.json)
        assert re.search(rf"^    {phase} +[\d.]+( \([\d.]+-[\d.]+\))? s +-?[\d.]+%", out, re.M), phase
    # the floor, and the lowest run_ratio it leaves: above 1. (Not compared with the run's own ratio: the floor is
    # timed in a process of its own, and on a busy machine it can take longer than the run's own start did.)
    floor = re.search(r"floor \(start, config, imports, load the pair\) +([\d.]+) s", out)
    lowest = re.search(r"lowest run_ratio: \(floor \+ training\) / training +([\d.]+)", out)
    assert floor and lowest and float(floor[1]) > 0 and float(lowest[1]) > 1, out
    assert re.search(r"own / fast +\d+\.\d{3} \(\d+\.\d{3}-\d+\.\d{3}\)", out)  # 3 rounds: median (min-max)
    assert not any(tmp_path.iterdir()), "the benchmark works in a temporary directory of its own"


def test_versus_prints_per_round_ratios(capsys):
    """--versus: per round the ratios versus / default of the wall time, training and evaluation, median (min-max)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_default

    def run(wall, train, evaluation):
        return {"wall": wall, "train": train, "method": "SFT", "steps": 200,
                "phases": {"training": train, "evaluation": evaluation, "rest": wall - train - evaluation}}

    default = [run(40.0, 10.0, 10.0), run(50.0, 10.0, 20.0), run(60.0, 20.0, 20.0)]
    versus = [run(80.0, 10.0, 30.0), run(50.0, 15.0, 20.0), run(90.0, 10.0, 50.0)]  # wall x2, x1, x1.5
    bench_default.print_versus("data=markov", default, versus)
    out = capsys.readouterr().out
    assert "with data=markov (kltd train data=markov: SFT, 200 steps, warm teacher cache): 3 round(s)" in out
    assert re.search(r"^  wall +1\.500 \(1\.000-2\.000\)$", out, re.M), out
    assert re.search(r"^  training +1\.000 \(0\.500-1\.500\)$", out, re.M), out  # 1, 1.5, 0.5
    assert re.search(r"^  evaluation +2\.500 \(1\.000-3\.000\)$", out, re.M), out  # 3, 1, 2.5


def test_versus_prints_the_sweeps_per_round_ratios(capsys):
    """--versus without --skip-sweep: the matrix sweep's section with the overrides, then its per-round ratios."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_default

    def sweep(wall, train, evaluation):  # phases summed over the sweep's runs
        return {"wall": wall, "train": train, "runs": 9, "phases": {"training": train, "evaluation": evaluation}}

    default = [sweep(100.0, 50.0, 10.0), sweep(120.0, 60.0, 10.0), sweep(110.0, 50.0, 20.0)]
    versus = [sweep(150.0, 100.0, 5.0), sweep(120.0, 30.0, 10.0), sweep(220.0, 100.0, 10.0)]  # wall x1.5, x1, x2
    bench_default.print_versus("data=addition", default, versus, "sweep=matrix")
    out = capsys.readouterr().out
    assert "sweep=matrix with data=addition (9 runs, warm teacher cache): 3 round(s)" in out
    assert "sweep=matrix data=addition / default, per round" in out
    assert re.search(r"^  wall +1\.500 \(1\.000-2\.000\)$", out, re.M), out
    assert re.search(r"^  training +2\.000 \(0\.500-2\.000\)$", out, re.M), out  # 2, 0.5, 2
    assert re.search(r"^  evaluation +0\.500 \(0\.500-1\.000\)$", out, re.M), out  # 0.5, 1, 0.5
