"""A run whose output goes to a file (nohup, SLURM, CI) prints plain progress lines: training steps, and what it
is doing during the evaluations and the teacher-cache fill; labels with brackets print whole."""

import json
import os
import subprocess
import sys

TINY = ["trainer.batch_size=4", "eval.num_prompts=4", "eval.batch_size=4", "eval.pass_k=2", "data.n_train=64",
        "data.n_eval=8", "model.device=cpu"]


def run_to_file(tmp_path, *args) -> str:
    log = tmp_path / "log.txt"
    with log.open("w") as out:  # a file, not a terminal: no bar can be drawn
        proc = subprocess.run([sys.executable, "-m", "kltd.app.cli", "train", *TINY, *args,
                               f"hydra.run.dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}"],
                              stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                              env={**os.environ, "WANDB_MODE": "disabled"}, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def test_a_redirected_run_prints_steps_and_its_phases(tmp_path):
    # progress_every_s=1e-6: every phase outlasts it, so each one reports; a line per step is due at once
    text = run_to_file(tmp_path, "trainer.max_steps=4", "trainer.log_every=2", "trainer.progress_every_s=1e-6")
    steps = [line.split()[1] for line in text.splitlines() if line.startswith("step ") and "running" not in line]
    assert steps[-1] == "4/4" and {"2/4", "4/4"} <= set(steps), text
    for phase in ("evaluation before training: done in", "teacher cache: done in",
                  "evaluation after step 4: done in"):
        assert phase in text, text
    assert "━━━ " not in text and "0:00:00 0:00:00" not in text  # no progress bar (its columns) in a file
    # the execution plan: one line in the output, the whole of it in metrics.json
    assert "plan: scoring student packed, teacher packed; loss fused head; teacher cache" in text
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["plan"]["training"]["student"] == {"packed": True, "decoder": "lean", "lockstep": False}
    assert summary["plan"]["fused_head"] and summary["approximations"] == []


def test_an_approximation_is_said_and_recorded(tmp_path):
    text = run_to_file(tmp_path, "trainer.max_steps=1", "method=opd", "sampling.top_p=0.9", "eval.before=false")
    assert "approximation: sampling.top_p=0.9: the states come from the nucleus of the student's distribution" in text
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [line.split(":")[0] for line in summary["approximations"]] == ["sampling.top_p=0.9"]


def test_every_n_steps_when_time_does_not_force_a_line(tmp_path):
    text = run_to_file(tmp_path, "trainer.max_steps=6", "trainer.log_every=3", "trainer.progress_every_s=3600",
                       "eval.before=false")
    steps = [line.split()[1] for line in text.splitlines() if line.startswith("step ") and "running" not in line]
    assert steps == ["3/6", "6/6"], text


def test_labels_with_brackets_print_whole(tmp_path):
    text = run_to_file(tmp_path, "trainer.max_steps=1", "divergence=kl_mix", "prefix=student", "eval.before=false")
    assert "DAgger [kl_mix(0.5)] (prefix=student, trajectory=expert)" in text
    assert "DAgger [kl_mix(0.5)]: held-out evaluation" in text
