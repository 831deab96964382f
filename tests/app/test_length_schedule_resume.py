"""A run with an entropy-gated horizon, killed with SIGKILL after the gate has moved and resumed, ends bit-identical to
the uninterrupted run: the gate's state travels in the checkpoint (a resumed run that forgot it would sample at the
first horizon again)."""

import json

import torch

from tests.app.test_faults import TINY, final_weights, history, resumed_after_kill, run

GATED = [*TINY, "eval.every=2", "sampling.length_schedule=entropy_gated", "sampling.lengths=[4,8,16]",
         "sampling.entropy_min=0.0"]


def test_killed_after_the_gate_moved_and_resumed_is_bit_identical(tmp_path):
    straight = tmp_path / "straight"
    out = run("train", *GATED, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "horizon 4 -> 8 tokens" in out.stdout and "horizon 8 -> 16 tokens" in out.stdout

    resumed = tmp_path / "resumed"
    # killed after the gate of step 2 (4 -> 8), before the one of step 4
    summary = resumed_after_kill(3, tmp_path, GATED, resumed)
    assert summary["horizon"] == json.loads((straight / "metrics.json").read_text())["horizon"]
    mine, theirs = final_weights(resumed), final_weights(straight)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert history(resumed) == history(straight)
