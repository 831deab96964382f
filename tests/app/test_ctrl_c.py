"""Ctrl-C outside the training loop (loading, an evaluation) ends the command with one line and exit 130, and the
run directory says interrupted, not failed."""

import json
import os
import subprocess
import sys

# evaluate() raises what Ctrl-C raises, at a known point: no timing involved
PROGRAM = """
import sys
import kltd.train.evaluation as evaluation

def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
evaluation.evaluate = interrupted
from kltd.app.cli import main
main(sys.argv[1:])
"""


def test_ctrl_c_during_the_evaluation_before_training_is_one_line_and_130(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", PROGRAM, "train", "trainer.max_steps=2", "eval.num_prompts=4",
                          "data.n_train=16", "data.n_eval=4", "cache.eval_before=false", f"hydra.run.dir={run}",
                          f"cache.dir={tmp_path / 'cache'}"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"},
                         timeout=600)
    assert out.returncode == 130, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1] == "kltd: train stopped by Ctrl-C"
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == 2 and summary["checkpoint"] is None
