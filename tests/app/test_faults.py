"""Fault injection through the real CLI: kills, preemption, numerical faults, shared directories, broken
inputs, a failing job inside a sweep. Each checks exit code, message and the state left on disk."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kltd.train.models import toy_dir

KLTD = [sys.executable, "-m", "kltd.app.cli"]
TINY = ["prefix=student", "trajectory=student", "trainer.max_steps=8", "trainer.batch_size=8", "trainer.log_every=1",
        "trainer.progress=false", "trainer.checkpoint_every=1", "eval.num_prompts=6", "eval.batch_size=6",
        "eval.pass_k=2", "data.n_train=64", "data.n_eval=8", "model.device=cpu", "trainer.num_threads=1"]
TIMING = ("train/tokens_per_s", "cost/wall_time_s")


def start(*args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen([*KLTD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=env)


def run(*args, cwd, timeout=600):
    proc = start(*args, cwd=cwd)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def steps_saved(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")) \
        if (run_dir / "checkpoints").is_dir() else []


def wait_for_step(proc, run_dir: Path, step: int, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if steps_saved(run_dir) and steps_saved(run_dir)[-1] >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step} (exit {proc.poll()})")


def trained_a_step(run_dir: Path) -> bool:
    log = run_dir / "metrics.jsonl"
    return log.exists() and "train/loss" in log.read_text()


def history(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    out = run("train", *TINY, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd / "run"


def test_killed_at_random_steps_and_resumed_is_bit_identical(uninterrupted, tmp_path):
    """SIGKILL twice, at steps drawn at random, then the same command again until it finishes: the final
    weights are bit-identical to the uninterrupted run, and so are the logged metrics (timings aside)."""
    run_dir = tmp_path / "run"
    kills = sorted(random.Random(int(time.time())).sample(range(2, 7), 2))
    for step in kills:
        proc = start("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        wait_for_step(proc, run_dir, step)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (run_dir / "metrics.json").exists() or \
            json.loads((run_dir / "metrics.json").read_text())["status"] != "completed"
    out = run("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout, f"killed at {kills}"
    summary = json.loads((run_dir / "metrics.json").read_text())
    straight = json.loads((uninterrupted / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] >= kills[-1]
    mine, theirs = final_weights(run_dir), final_weights(uninterrupted)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), f"killed at {kills}"
    assert history(run_dir) == history(uninterrupted)
    assert summary["eval_after"] == straight["eval_after"] and summary["final_loss"] == straight["final_loss"]
    assert summary["tokens"] == straight["tokens"]
    assert len(steps_saved(run_dir)) == 2  # trainer.keep_checkpoints


def test_sigterm_saves_a_checkpoint_and_says_interrupted(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start("train", *TINY, "trainer.checkpoint_every=0", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not trained_a_step(run_dir):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and "Traceback" not in err
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "interrupted" and steps_saved(run_dir) == [summary["step"]]
    out = run("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)  # a requeued job: the same command
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    mine, theirs = final_weights(run_dir), final_weights(uninterrupted)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def killed_after(step: int, tmp_path: Path) -> Path:
    """A run killed with SIGKILL once it has saved the checkpoint of `step` (or a later one)."""
    run_dir = tmp_path / "run"
    proc = start("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for_step(proc, run_dir, step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return run_dir


def test_resume_by_name_refuses_changes_that_alter_the_result(tmp_path):
    run_dir = killed_after(2, tmp_path)
    refused = run("train", f"resume={run_dir}", "trainer.lr=0.5", cwd=tmp_path)
    assert refused.returncode != 0 and "trainer.lr=0.5" in refused.stderr and "Traceback" not in refused.stderr
    out = run("train", f"resume={run_dir}", "wandb.mode=disabled", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    again = run("train", f"resume={run_dir}", cwd=tmp_path)
    assert again.returncode == 0 and "finished run" in again.stderr


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    run_dir = killed_after(4, tmp_path)
    newest = steps_saved(run_dir)[-1]
    weights = run_dir / "checkpoints" / f"step-{newest:06d}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = run("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"step-{newest:06d} is unreadable" in out.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["resumed_from_step"] == newest - 1


def test_an_exploding_learning_rate_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    out = run("train", *TINY, "trainer.lr=1e30", "trainer.warmup_steps=0", "trainer.max_grad_norm=1e30",
              f"hydra.run.dir={run_dir}", cwd=tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "at step" in lines[0] and ("NaN" in lines[0] or "nan" in lines[0] or "inf" in lines[0])
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "failed" and steps_saved(run_dir) and steps_saved(run_dir)[-1] >= 1


def test_two_runs_at_the_same_moment_get_two_directories_and_a_shared_one_is_refused(tmp_path):
    args = ["prefix=fixed", "trainer.max_steps=3", "trainer.batch_size=4", "eval.num_prompts=4", "eval.batch_size=4",
            "eval.pass_k=2", "data.n_train=32", "data.n_eval=8", "trainer.progress=false", "model.device=cpu"]
    procs = [start("train", *args, cwd=tmp_path) for _ in range(2)]
    for proc in procs:
        proc.communicate(timeout=300)
        assert proc.returncode == 0
    dirs = [p.parent for p in tmp_path.glob("outputs/runs/*/*/metrics.json")]
    assert len(set(dirs)) == 2
    shared = tmp_path / "shared"
    long = [*TINY, "trainer.max_steps=1000"]  # still running when the second one starts
    first = start("train", *long, f"hydra.run.dir={shared}", cwd=tmp_path)
    wait_for_step(first, shared, 1)
    saved_config = (shared / ".hydra" / "config.yaml").read_text()
    second = run("train", *long, "trainer.lr=0.01", f"hydra.run.dir={shared}", cwd=tmp_path)
    assert first.poll() is None, "the first run ended too soon for this test"
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
    assert second.returncode != 0 and "in use by a live run" in second.stderr
    # the first run is unharmed: its own config, its own summary
    assert (shared / ".hydra" / "config.yaml").read_text() == saved_config
    assert first.returncode == 143 and json.loads((shared / "metrics.json").read_text())["status"] == "interrupted"


def corrupt_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target


def test_a_failing_job_does_not_stop_the_sweep_or_its_comparison(tmp_path):
    broken = corrupt_copy(toy_dir() / "student", tmp_path / "broken")
    sweep = tmp_path / "sweep"
    out = run("train", "-m", f"model.student=toy/student,{broken}", "prefix=fixed", "trainer.max_steps=2",
              "trainer.batch_size=4", "eval.num_prompts=4", "eval.batch_size=4", "eval.pass_k=2", "data.n_train=32",
              "data.n_eval=8", "trainer.progress=false", "model.device=cpu", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 1
    failed = [line for line in out.stderr.splitlines() if line.startswith("kltd: job ")]
    assert len(failed) == 1 and "truncated or corrupt" in failed[0] and "Traceback" not in out.stderr
    statuses = sorted(json.loads(p.read_text())["status"] for p in sweep.glob("*/metrics.json"))
    assert statuses == ["completed", "failed"]
    assert (sweep / "results.md").is_file() and "failed" in (sweep / "results.md").read_text()


@pytest.mark.parametrize("args,words", [
    (["+trainer.max_step=5"], "unknown key 'trainer.max_step'"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 must be >= 1"),
    (["hydra.run.dir=FILE/run"], "is a file"),
    (["cache.dir=FILE/cache"], "cache.dir"),
    (["model.student=BROKEN"], "truncated or corrupt"),
    (["data=file", "data.path=LATIN"], "not UTF-8"),
])
def test_bad_inputs_get_one_line_and_no_traceback(tmp_path, args, words):
    (tmp_path / "file").write_text("a regular file")
    broken = corrupt_copy(toy_dir() / "student", tmp_path / "broken")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    args = [a.replace("FILE", str(tmp_path / "file")).replace("BROKEN", str(broken)).replace("LATIN", str(latin))
            for a in args]
    steps = [] if any(a.startswith("trainer.max_steps") for a in args) else ["trainer.max_steps=2"]
    out = run("train", *args, *steps, "trainer.progress=false", "model.device=cpu", cwd=tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert words in lines[0]


def test_a_zero_length_teacher_cache_is_rebuilt_with_a_warning(tmp_path):
    args = ["prefix=fixed", "trainer.max_steps=2", "trainer.batch_size=4", "eval.num_prompts=4", "eval.batch_size=4",
            "eval.pass_k=2", "data.n_train=32", "data.n_eval=8", "trainer.progress=false", "model.device=cpu",
            f"cache.dir={tmp_path / 'cache'}"]
    assert run("train", *args, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path).returncode == 0
    (entry,) = (tmp_path / "cache").glob("teacher-*.pt")
    entry.write_bytes(b"")
    out = run("train", *args, f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert out.returncode == 0 and "unreadable" in out.stdout and "rebuilding" in out.stdout
    assert entry.stat().st_size > 0
