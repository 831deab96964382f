"""A run killed with SIGKILL inside its RL stage (rl=grpo) and resumed ends bit-identical to the uninterrupted run:
the RL stage's optimiser, data position and counters are in its checkpoints, and the starting policy (the reference of
rl.kl_weight) is read back from before_rl/."""

import json
import signal

import torch

from tests.app.test_faults import HANG_GUARD_S, TINY, final_weights, history, run, start, wait_for_step

GRPO = [*TINY, "trainer.max_steps=3", "rl=grpo", "rl.steps=4", "rl.group_size=4", "rl.batch_size=8",
        "rl.kl_weight=0.1", "rl.epochs=2", "trajectory=expert"]


def test_killed_inside_the_rl_stage_and_resumed_is_bit_identical(tmp_path):
    straight = tmp_path / "straight"
    out = run("train", *GRPO, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RL stage: GRPO for 4 steps after step 3" in out.stdout

    resumed = tmp_path / "resumed"
    proc = start("train", *GRPO, f"hydra.run.dir={resumed}", cwd=tmp_path)
    wait_for_step(proc, resumed, 5)  # two RL steps done
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD_S)
    out = run("train", *GRPO, f"hydra.run.dir={resumed}", cwd=tmp_path)
    assert out.returncode == 0 and "resuming" in out.stdout, out.stderr[-3000:]
    summary = json.loads((resumed / "metrics.json").read_text())
    theirs = json.loads((straight / "metrics.json").read_text())
    assert summary["resumed_from_step"] >= 5 and summary["status"] == "completed"
    for key in ("eval_after_distillation", "eval_after", "final_loss", "tokens", "compute"):
        assert summary[key] == theirs[key], key
    mine, straight_weights = final_weights(resumed), final_weights(straight)
    assert all(torch.equal(mine[k], straight_weights[k]) for k in straight_weights)
    def untimed(run_dir):  # the RL stage's throughput is a timing like train/tokens_per_s
        return [{k: v for k, v in row.items() if k != "rl/tokens_per_s"} for row in history(run_dir)]

    assert untimed(resumed) == untimed(straight)
