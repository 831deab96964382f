"""`kltd train distributed.nproc_per_node=2` as a user runs it: a multirun of data-parallel jobs, and a
data-parallel run stopped by SIGTERM (a preemption) that resumes to the weights of an uninterrupted run.
(That two processes take the steps of one is tests/train/test_data_parallel.py's, to float32's bounds.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

KLTD = [sys.executable, "-m", "kltd.app.cli"]
TINY = ["trainer.batch_size=8", "trainer.progress=false", "eval.num_prompts=4", "eval.batch_size=4", "eval.pass_k=2",
        "eval.before=false", "data.n_train=64", "data.n_eval=8", "model.device=cpu", "trainer.log_every=1"]
ENV = {**os.environ, "WANDB_MODE": "disabled"}


def kltd(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*KLTD, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=900)


def test_a_multirun_of_data_parallel_jobs_gives_each_job_its_run(tmp_path):
    sweep = tmp_path / "sweep"
    out = kltd("train", "-m", "distributed.nproc_per_node=2", "prefix=fixed,student", "trajectory=expert",
               "trainer.max_steps=3", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert [(s["prefix"], s["status"]) for s in summaries] == [("fixed", "completed"), ("student", "completed")]
    assert all(s["config"]["distributed"]["nproc_per_node"] == 2 for s in summaries)
    assert out.stdout.count("data parallel: 2 processes") == 2
    assert out.stdout.count("data: the built-in") == 2  # process 0 speaks for its job; the other stays quiet
    assert (sweep / "results.md").is_file()


def steps_saved(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []


def test_a_preempted_data_parallel_run_resumes_to_the_uninterrupted_weights(tmp_path):
    args = ["train", "prefix=student", "trajectory=student", "trainer.max_steps=12", "trainer.checkpoint_every=1",
            "distributed.nproc_per_node=2", *TINY]
    whole = tmp_path / "whole"
    assert kltd(*args, f"hydra.run.dir={whole}", cwd=tmp_path).returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*KLTD, *args, f"hydra.run.dir={cut}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=ENV)
    # no clock decides when the signal goes: after the step-2 checkpoint, however long a busy machine takes to
    # get there (the limit only stops a hung run, at the same 900 s the other runs get)
    limit = time.monotonic() + 900
    while "step-000002" not in steps_saved(cut) and proc.poll() is None and time.monotonic() < limit:
        time.sleep(0.05)
    if proc.poll() is not None or "step-000002" not in steps_saved(cut):
        proc.kill()
        pytest.fail(f"the run ended (or hung) before it could be stopped after its step-2 checkpoint: "
                    f"{proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=900)
    summary = json.loads((cut / "metrics.json").read_text())
    assert proc.returncode == 143 and summary["status"] == "interrupted", err[-2000:]
    assert summary["step"] < 12 and "Traceback" not in err and "interrupted by SIGTERM" in err
    resumed = kltd(*args, f"hydra.run.dir={cut}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((cut / "metrics.json").read_text())["resumed_from_step"] == summary["step"]
    a, b = (load_file(str(d / "checkpoint" / "model.safetensors")) for d in (whole, cut))
    # the same two processes take the same steps in the same order of float32 operations, whether or not the
    # run stopped in between (the checkpoint holds every state a step reads): equal to the bit
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
