"""Fault injection through the real CLI: kills, preemption, numerical faults, shared directories, broken
inputs, a failing job inside a sweep. Each checks exit code, message and the state left on disk."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kltd.train.models import markov_dir

KLTD = [sys.executable, "-m", "kltd.app.cli"]
TINY = ["prefix=student", "trajectory=student", "trainer.max_steps=8", "trainer.batch_size=8", "trainer.log_every=1",
        "trainer.progress=false", "trainer.checkpoint_every=1", "eval.num_prompts=6", "eval.batch_size=6",
        "eval.pass_k=2", "data.n_train=64", "data.n_eval=8", "model.device=cpu", "trainer.num_threads=1"]
TIMING = ("train/tokens_per_s", "cost/wall_time_s")
# A hang guard, never a condition: every wait below is for something the run does (a checkpoint saved, a step
# trained, the process exited), however long a loaded machine takes; only a run stuck this long fails on it.
HANG_GUARD_S = 900


def start(*args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen([*KLTD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=env)


def run(*args, cwd, timeout=HANG_GUARD_S):
    proc = start(*args, cwd=cwd)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def finished_run(*args, cwd: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """`kltd train ARGS` run to the end in cwd/run (the uninterrupted run a resumed one is held against)."""
    out = run("train", *args, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd / "run", out


def steps_saved(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")) \
        if (run_dir / "checkpoints").is_dir() else []


def wait_until(condition, proc, what: str) -> None:
    """Wait until `condition()` holds while `proc` runs. Fails (and kills the run) if the run ends first, or if
    it hangs past HANG_GUARD_S: the deadline is never taken for the condition."""
    limit = time.monotonic() + HANG_GUARD_S
    while not condition():
        if proc.poll() is not None or time.monotonic() > limit:
            ended = proc.poll() is not None
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the run {'ended (exit ' + str(proc.returncode) + ')' if ended else 'hung'} before "
                        f"{what}: {err[-2000:]}")
        time.sleep(0.05)


def wait_for_step(proc, run_dir: Path, step: int) -> None:
    wait_until(lambda: bool(steps_saved(run_dir)) and steps_saved(run_dir)[-1] >= step, proc,
               f"it saved the checkpoint of step {step}")


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
    return finished_run(*TINY, cwd=tmp_path_factory.mktemp("straight"))[0]


# Where the two kills go: after these steps' checkpoints (of 8 steps). Fixed, so that a failure is the same on
# every run and can be reproduced: an early step (the optimiser's state and the data order barely started) and
# a late one (resumed from a resumed run). A kill lands at or after its step (the run may save more before the
# signal arrives): the steps actually saved at each kill are in every message.
KILL_AFTER = (2, 5)


def test_killed_at_two_steps_and_resumed_is_bit_identical(uninterrupted, tmp_path):
    """SIGKILL twice, after the checkpoints of KILL_AFTER, then the same command again until it finishes: the
    final weights are bit-identical to the uninterrupted run, and so are the logged metrics (timings aside)."""
    run_dir = tmp_path / "run"
    killed = []  # (the step waited for, the checkpoints on disk when the kill was sent)
    for step in KILL_AFTER:
        proc = start("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        wait_for_step(proc, run_dir, step)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG_GUARD_S)
        killed.append((step, steps_saved(run_dir)))
        assert not (run_dir / "metrics.json").exists() or \
            json.loads((run_dir / "metrics.json").read_text())["status"] != "completed", f"killed at {killed}"
    kills = [step for step, _ in killed]
    out = run("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, f"killed at {killed}: {out.stderr[-3000:]}"
    assert "resuming" in out.stdout, f"killed at {killed}"
    summary = json.loads((run_dir / "metrics.json").read_text())
    straight = json.loads((uninterrupted / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] >= kills[-1], f"killed at {killed}"
    mine, theirs = final_weights(run_dir), final_weights(uninterrupted)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), f"killed at {killed}"
    assert history(run_dir) == history(uninterrupted), f"killed at {killed}"
    assert summary["eval_after"] == straight["eval_after"] and summary["final_loss"] == straight["final_loss"], \
        f"killed at {killed}"
    assert summary["tokens"] == straight["tokens"], f"killed at {killed}"
    assert len(steps_saved(run_dir)) == 2, f"killed at {killed}"  # trainer.keep_checkpoints


def test_sigterm_saves_a_checkpoint_and_says_interrupted(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start("train", *TINY, "trainer.checkpoint_every=0", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_until(lambda: trained_a_step(run_dir), proc, "it trained a step")  # only then is the signal sent
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=HANG_GUARD_S)
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


def killed_after(step: int, tmp_path: Path, args=TINY, run_dir: Path | None = None) -> Path:
    """A run of `args` killed with SIGKILL once it has saved the checkpoint of `step` (or a later one)."""
    run_dir = run_dir or tmp_path / "run"
    proc = start("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for_step(proc, run_dir, step)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD_S)
    return run_dir


def resumed_after_kill(step: int, tmp_path: Path, args, run_dir: Path) -> dict:
    """killed_after, then the same command again: it must resume and finish; its metrics.json."""
    killed_after(step, tmp_path, args, run_dir)
    out = run("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0 and "resuming" in out.stdout, out.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["resumed_from_step"] >= step
    return summary


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
        proc.communicate(timeout=HANG_GUARD_S)
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
    first.communicate(timeout=HANG_GUARD_S)
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
    broken = corrupt_copy(markov_dir() / "student", tmp_path / "broken")
    sweep = tmp_path / "sweep"
    out = run("train", "-m", f"model.student=markov/student,{broken}", "prefix=fixed", "trainer.max_steps=2",
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
    (["trainer.max_steps=0"], "trainer.max_steps=0 trains nothing; it is for an RL stage alone"),
    (["hydra.run.dir=FILE/run"], "is a file"),
    (["cache.dir=FILE/cache"], "cache.dir"),
    (["model.student=BROKEN"], "truncated or corrupt"),
    (["data=file", "data.path=LATIN"], "not UTF-8"),
])
def test_bad_inputs_get_one_line_and_no_traceback(tmp_path, args, words):
    (tmp_path / "file").write_text("a regular file")
    broken = corrupt_copy(markov_dir() / "student", tmp_path / "broken")
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


# --- a full disk --------------------------------------------------------------------------------------------


def tiny_job_config(**trainer):
    """The toy pair, a few steps, a checkpoint every step (in-process jobs through kltd.train.job.train_job)."""
    from kltd.schema.config import Config

    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor = "fixed", "expert"
    cfg.model.device, cfg.wandb.mode, cfg.cache.teacher = "cpu", "disabled", "off"
    cfg.data.n_train, cfg.data.n_eval = 32, 8
    cfg.eval.num_prompts, cfg.eval.batch_size, cfg.eval.pass_k = 4, 4, 2
    cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.progress = 4, 4, False
    cfg.trainer.checkpoint_every, cfg.trainer.keep_checkpoints, cfg.trainer.num_threads = 1, 2, 1
    for key, value in trainer.items():
        setattr(cfg.trainer, key, value)
    return cfg


def no_space(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def temporaries(run_dir: Path) -> list[Path]:
    return [p for d in (run_dir, run_dir / "checkpoints") if d.is_dir() for p in d.iterdir() if ".tmp" in p.name]


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_one_before(tmp_path, monkeypatch):
    """ENOSPC half way through the checkpoint of step 3 (its weights written, the trainer state not): one line
    naming it and the checkpoint a rerun resumes from; metrics.json says failed with that reason; the
    checkpoints before are intact and load; nothing half-written is left."""
    from kltd.files import DiskFull
    from kltd.train import checkpoint
    from kltd.train.job import train_job

    plain = checkpoint.torch.save

    def filling(obj, target, *args, **kwargs):
        if Path(target).parent.name.startswith(".step-000003"):
            Path(target).write_bytes(b"\0" * 1000)  # the disk fills while this file is written
            raise no_space(target)
        return plain(obj, target, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", filling)
    run_dir = tmp_path / "run"
    with pytest.raises(DiskFull) as caught:
        train_job(tiny_job_config(), run_dir)
    before = run_dir / "checkpoints" / "step-000002"
    assert str(caught.value) == (f"no space left on device while writing {run_dir / 'checkpoints' / 'step-000003'}; "
                                 f"free space and rerun the same command to resume from {before}")
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == f"DiskFull: {caught.value}"
    assert steps_saved(run_dir) == [1, 2] and temporaries(run_dir) == []
    assert checkpoint.latest(run_dir).progress.step == 2
    monkeypatch.undo()  # space freed: the same job resumes from step 2 and finishes
    summary = train_job(tiny_job_config(), run_dir)
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 2


def test_a_full_disk_while_saving_the_trained_student_is_one_line_and_the_rerun_finishes(tmp_path, monkeypatch):
    import transformers

    from kltd.files import DiskFull
    from kltd.train.job import train_job

    def filling(self, directory, *args, **kwargs):  # the weights are written, then the tokenizer's files fill it
        (Path(directory) / "tokenizer.json").write_text("{")
        raise no_space(Path(directory) / "tokenizer.json")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", filling)
    run_dir = tmp_path / "run"
    with pytest.raises(DiskFull) as caught:
        train_job(tiny_job_config(save_checkpoint=True), run_dir)
    newest = run_dir / "checkpoints" / "step-000004"
    assert str(caught.value) == (f"no space left on device while writing {run_dir / 'checkpoint'}; free space and "
                                 f"rerun the same command to resume from {newest}")
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
    assert not (run_dir / "checkpoint").exists() and temporaries(run_dir) == []
    monkeypatch.undo()
    summary = train_job(tiny_job_config(save_checkpoint=True), run_dir)
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 4
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()


def test_a_full_disk_while_writing_the_summary_names_it_and_the_checkpoint_to_resume_from(tmp_path, monkeypatch):
    import kltd.train.job as job
    from kltd.app.train_command import disk_full_line
    from kltd.files import DiskFull, atomic_write, atomic_write_json

    def filling(path, payload):
        if Path(path).name == "metrics.json" and payload.get("status") == "completed":
            def half(tmp):
                tmp.write_text('{"status": "comp')
                raise no_space(tmp)

            return atomic_write(path, half)
        return atomic_write_json(path, payload)

    monkeypatch.setattr(job, "atomic_write_json", filling)
    run_dir = tmp_path / "run"
    with pytest.raises(DiskFull) as caught:
        job.train_job(tiny_job_config(), run_dir)
    assert not (run_dir / "metrics.json").exists() and temporaries(run_dir) == []
    line = str(disk_full_line(caught.value, run_dir))  # what `kltd train` prints
    assert line == (f"no space left on device while writing {run_dir / 'metrics.json'}; free space and rerun the same "
                    f"command to resume from {run_dir / 'checkpoints' / 'step-000004'}")
    # a write that fails for lack of space without saying so (torch's zip writer) on a full device, and one
    # that says it in words (safetensors), are recognised too; any other error is not
    assert disk_full_line(RuntimeError("Error while serializing: No space left on device (os error 28)"), run_dir)
    assert disk_full_line(RuntimeError("unexpected pos 704 vs 598"), run_dir) is None


@pytest.fixture
def small_device(tmp_path):
    """A 3 MB file system (tmpfs): room for one training checkpoint of the toy student, not two. Skipped where
    this process may not mount one (not root, or no CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {made.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_really_full_disk_is_one_line_through_the_cli_and_the_rerun_resumes(tmp_path, small_device):
    """A real ENOSPC (torch.save fails with its own RuntimeError there): one line, exit 1, the newest complete
    checkpoint intact, no temporary left; with space freed the same command resumes from that checkpoint."""
    from kltd.train import checkpoint

    run_dir = small_device / "run"
    # the toy student's checkpoints, sized against the device (the default Markov pair's are a few kB)
    args = ["train", *TINY, "data=addition", "prefix=fixed", "trajectory=expert", f"hydra.run.dir={run_dir}"]
    out = run(*args, cwd=tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    saved = steps_saved(run_dir)
    assert saved and lines[0] == (
        f"kltd: error: no space left on device while writing {run_dir / 'checkpoints'}/step-{saved[-1] + 1:06d}; "
        f"free space and rerun the same command to resume from {run_dir / 'checkpoints'}/step-{saved[-1]:06d}")
    assert temporaries(run_dir) == [] and checkpoint.latest(run_dir).progress.step == saved[-1]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "failed" and "no space left on device" in summary["error"]
    grown = subprocess.run(["mount", "-o", "remount,size=32m", str(small_device)], capture_output=True)
    assert grown.returncode == 0, grown.stderr
    out = run(*args, "trainer.keep_checkpoints=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == saved[-1]


# --- what a kill leaves behind ------------------------------------------------------------------------------


def test_temporaries_of_a_killed_writer_go_when_the_run_starts_again_and_a_live_writers_stay(tmp_path):
    from kltd.train import checkpoint

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its process id now names no process: the writer of a temporary killed with -9
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        run_dir = tmp_path / "run"
        stale = [run_dir / "checkpoints" / f".step-000050.tmp{gone.pid}", run_dir / f".checkpoint.tmp{gone.pid}"]
        for directory in stale:
            directory.mkdir(parents=True)
            (directory / "model.safetensors").write_bytes(b"\0" * 100)
        stale.append(run_dir / f".metrics.json.tmp{gone.pid}")
        stale[-1].write_text("{")
        writing = run_dir / "checkpoints" / f".step-000051.tmp{live.pid}"
        writing.mkdir()
        kept = [run_dir / "checkpoints" / "step-000049", run_dir / "notes.tmp", run_dir / ".lock"]
        kept[0].mkdir()
        kept[1].write_text("not kltd's")
        kept[2].write_text("")
        assert checkpoint.latest(run_dir, echo=lambda line: None) is None  # where a run starts in the directory
        assert not any(p.exists() for p in stale)
        assert writing.is_dir() and all(p.exists() for p in kept)
    finally:
        live.kill()
        live.wait()


# --- a job of a sweep, resumed alone ------------------------------------------------------------------------


def test_a_resumed_job_of_a_sweep_keeps_its_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    out = run("train", "-m", "seed=0", "hydra/launcher=basic", *TINY, "trainer.max_steps=2",
              f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (job,) = [p.parent for p in sweep.glob("*/metrics.json")]
    assert json.loads((job / "metrics.json").read_text())["sweep"] == "sweep"
    (job / "metrics.json").unlink()  # as if it had been stopped after its last checkpoint
    out = run("train", f"resume={job}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((job / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 2 and summary["sweep"] == "sweep"
