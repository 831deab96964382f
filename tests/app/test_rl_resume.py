"""A run stopped inside its RL stage (rl=grpo) and resumed ends bit-identical to the uninterrupted run: the RL stage's
optimiser, data position and counters are in its checkpoints, and the starting policy (the reference of
rl.kl_weight) is read back from before_rl/. SIGKILL (nothing saved on the way out) and SIGTERM (a checkpoint of the
step it stops after, exit 143) both."""

import json
import signal

import pytest
import torch

from tests.app.test_faults import (HANG_GUARD_S, TINY, final_weights, finished_run, history, resumed_after_kill, run,
                                   start, steps_saved, trained_a_step, wait_until)

GRPO = [*TINY, "trainer.max_steps=3", "rl=grpo", "rl.steps=4", "rl.group_size=4", "rl.batch_size=8",
        "rl.kl_weight=0.1", "rl.epochs=2", "trajectory=expert"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir, out = finished_run(*GRPO, cwd=tmp_path_factory.mktemp("straight"))
    assert "RL stage: GRPO for 4 steps after step 3" in out.stdout
    return run_dir


def untimed(run_dir):  # the RL stage's throughput is a timing, like train/tokens_per_s
    return [{k: v for k, v in row.items() if k != "rl/tokens_per_s"} for row in history(run_dir)]


def assert_same_run(resumed, straight):
    summary = json.loads((resumed / "metrics.json").read_text())
    theirs = json.loads((straight / "metrics.json").read_text())
    assert summary["status"] == "completed"
    for key in ("eval_after_distillation", "eval_after", "final_loss", "tokens", "compute"):
        assert summary[key] == theirs[key], key
    mine, straight_weights = final_weights(resumed), final_weights(straight)
    assert all(torch.equal(mine[k], straight_weights[k]) for k in straight_weights)
    assert untimed(resumed) == untimed(straight)
    return summary


def test_killed_inside_the_rl_stage_and_resumed_is_bit_identical(tmp_path, straight):
    resumed = tmp_path / "resumed"
    resumed_after_kill(5, tmp_path, GRPO, resumed)  # two RL steps done
    assert_same_run(resumed, straight)


def test_sigterm_inside_the_rl_stage_saves_its_step_and_the_same_command_finishes_it(tmp_path, straight):
    resumed = tmp_path / "resumed"
    proc = start("train", *GRPO, "trainer.checkpoint_every=0", f"hydra.run.dir={resumed}", cwd=tmp_path)
    wait_until(lambda: trained_a_step(resumed) and "rl/loss" in (resumed / "metrics.jsonl").read_text(), proc,
               "it trained an RL step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 143 and "interrupted by SIGTERM" in err and "Traceback" not in err, err[-2000:]
    interrupted = json.loads((resumed / "metrics.json").read_text())
    assert interrupted["status"] == "interrupted" and steps_saved(resumed)[-1] == interrupted["step"]
    assert interrupted["step"] > 3  # inside the RL stage
    out = run("train", *GRPO, "trainer.checkpoint_every=0", f"hydra.run.dir={resumed}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert assert_same_run(resumed, straight)["resumed_from_step"] == interrupted["step"]
