"""scripts/bench_eval_share.py: its projection's arithmetic, and a smoke run (shrunk smollm2 pair, one round)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench_eval_share import DEFAULT_PROMPTS, DEFAULT_STEPS, shares  # noqa: E402

LAST_LINE = re.compile(r"eval_share_run=(?P<run>\d\.\d{3}) eval_share_default=(?P<default>\d\.\d{3}) "
                       r"eval_share_sweep=(?P<sweep>\d\.\d{3})")


def test_the_shares_follow_from_the_measured_times():
    # a run of 3 steps at 2 s and 2 x 4 questions at 0.5 s: 4 s of evaluation against 6 s of training
    run = {"evaluation": 4.0, "training": 6.0, "per_step": 2.0, "per_question": 0.5}
    got = shares(run)
    assert got["run"] == pytest.approx(0.4)
    # default length: 200 steps = 400 s; one evaluation of 200 questions = 100 s, two of them 200 s
    assert (DEFAULT_STEPS, DEFAULT_PROMPTS) == (200, 200)
    assert got["default"] == pytest.approx(200 / 600)
    assert got["sweep"] == pytest.approx(100 / 500)  # the evaluation before read from the sweep's cache


def test_a_smoke_run_prints_the_three_shares(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    tiny = ["trainer.batch_size=2", "sampling.max_new_tokens=4", "eval.max_new_tokens=4", "eval.intervals=0",
            "model.device=cpu"]
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_eval_share.py"), "--quick", "--rounds", "1",
                           "--steps", "1", "--prompts", "2", "--keep", str(tmp_path / "work"), *tiny],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = LAST_LINE.fullmatch(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout[-2000:]
    values = {k: float(v) for k, v in match.groupdict().items()}
    assert all(0 < v < 1 for v in values.values()), values
    assert values["sweep"] <= values["default"]  # one evaluation of the same length, not two
    assert "smollm2" in proc.stdout and "(shrunk: --quick)" in proc.stdout
    assert (tmp_path / "work" / "runs" / "round1" / "metrics.json").is_file()
