"""Hydra's launchers run kltd's sweeps: joblib (jobs side by side in worker processes), submitit_local
(one subprocess per job, as on a cluster), and the SLURM preset, validated by composition."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kltd.app.train_command import config_dir

TINY = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.progress=false", "eval.num_prompts=4",
        "eval.batch_size=4", "eval.pass_k=2", "data.n_train=64", "data.n_eval=8", "model.device=cpu"]


# A hang guard, never a condition: each wait is for what the processes do (a step trained, every process gone),
# however long a loaded machine takes; only a sweep stuck this long fails on it.
HANG_GUARD_S = 900


def kltd(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kltd.app.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "WANDB_MODE": "disabled"}, timeout=HANG_GUARD_S)


# The matrix sweep on each launcher (joblib by default here, basic, submitit_local) is run as the README shows it,
# by tests/app/test_documented_commands.py, which checks the sweep's cells, files and the launcher named.


def test_a_failed_job_in_worker_processes_still_fails_the_command(tmp_path):
    """With jobs in other processes the failure is read from the run directories, not from this process."""
    sweep = tmp_path / "sweep"
    out = kltd("train", "-m", "hydra/launcher=joblib", "prefix=student", "trainer.lr=1e30,0.001",
               "trainer.warmup_steps=0", "trainer.max_grad_norm=1e30", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 1 and "1 job(s) of the sweep did not complete" in out.stderr
    assert sorted(json.loads(p.read_text())["status"] for p in sweep.glob("*/metrics.json")) == ["completed", "failed"]


def test_a_sweep_without_a_gpu_runs_side_by_side_unless_told_otherwise(monkeypatch, capsys):
    from kltd.app.train_command import side_by_side
    from kltd.schema.config import Config

    cfg = Config()
    cfg.model.device = "cpu"
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert side_by_side(["sweep=matrix"], cfg, 9) == ["sweep=matrix", "hydra/launcher=joblib"]
    assert "9 jobs side by side, 4 at a time on 4 cores" in capsys.readouterr().err
    for argv in (["sweep=matrix", "hydra/launcher=basic"], ["-m", "seed=1,2", "hydra.launcher.n_jobs=2"]):
        assert side_by_side(argv, cfg, 9) == argv  # the command's own choice
    assert side_by_side(["seed=1"], cfg, 1) == ["seed=1"]  # one job
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert side_by_side(["sweep=matrix"], cfg, 9) == ["sweep=matrix"]  # one core
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    cfg.model.device = "cuda"
    assert side_by_side(["sweep=matrix"], cfg, 9) == ["sweep=matrix"]  # jobs on a GPU take turns
    cfg.model.device, cfg.distributed.nproc_per_node = "cpu", 2
    assert side_by_side(["sweep=matrix"], cfg, 9) == ["sweep=matrix"]  # data-parallel jobs use the cores already


def test_the_slurm_preset_composes_with_requeueing():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.nodes) == ("gpu", 4, 1)
    assert launcher.additional_parameters.requeue is True and launcher.max_num_timeout >= 1
    assert launcher.timeout_min > 0 and launcher.signal_delay_s > 0


# --- SIGTERM and Ctrl-C to a sweep ---------------------------------------------------------------------------

# Jobs that are still training whenever the signal comes (no job can reach the last step first); a rerun of the
# same command resumes them, and is stopped the same way.
LONG = ["prefix=student", "trajectory=student", "trainer.max_steps=100000", "trainer.batch_size=8",
        "trainer.log_every=1", "trainer.progress=false", "trainer.checkpoint_every=0", "eval.num_prompts=6",
        "eval.batch_size=6", "eval.pass_k=2", "data.n_train=64", "data.n_eval=8", "model.device=cpu",
        "trainer.num_threads=1"]


def start(args, cwd, new_session=False):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, "WANDB_MODE": "disabled"}, start_new_session=new_session)


def trained_steps(run_dir: Path) -> list[int]:
    log = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    return [row["step"] for row in rows if "train/loss" in row]


def wait_until(condition, proc, what: str):
    limit = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < limit:
        if condition():
            return
        assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before {what}"
        time.sleep(0.1)
    raise AssertionError(f"the sweep hung ({HANG_GUARD_S} s) before {what}")


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], list(children.get(pid, []))
    while stack:
        found.append(stack.pop())
        stack.extend(children.get(found[-1], []))
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")  # a zombie has ended (nobody may reap it in a container)


def assert_all_gone(pids: list[int]) -> None:
    """Every process of the sweep exits: waited for, however long a loaded machine takes to finish their steps
    and exit; what still runs after the hang guard was left behind."""
    limit = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < limit and any(running(pid) for pid in pids):
        time.sleep(0.2)
    left = [pid for pid in pids if running(pid)]
    assert not left, f"processes of the sweep were left behind ({HANG_GUARD_S} s after it stopped): {left}"


@pytest.fixture
def reaper():
    """The commands of a test (Popen) and processes of their sweeps (pids): whatever still runs when the test
    ends (it failed) is killed, the commands' descendants included."""
    taken: list = []
    yield taken
    pids = [p for p in taken if isinstance(p, int)]
    for proc in (p for p in taken if not isinstance(p, int)):
        pids += [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def stopped(proc, signum: int, pids: list[int]) -> tuple[str, str]:
    """What the sweep printed once it stopped with 128 + signum (one line on stderr, no traceback)."""
    proc.wait(timeout=HANG_GUARD_S)
    assert_all_gone(pids)  # before reading its output: processes left behind would hold the pipes open
    out, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 128 + signum, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err + out, err[-3000:]
    assert lines[0].startswith(f"kltd: sweep stopped by {signal.Signals(signum).name}: ")
    assert_all_gone(pids)
    return out, lines[0]


def interrupted(run_dir: Path, signum: int) -> int:
    """The step an interrupted job stopped after, checked against its checkpoint and its log."""
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == signum and summary["sweep"] == "sweep"
    assert Path(summary["checkpoint"]).name == f"step-{summary['step']:06d}"
    assert (run_dir / "checkpoints" / f"step-{summary['step']:06d}" / "progress.json").is_file()
    assert trained_steps(run_dir) == list(range(1, summary["step"] + 1))  # continued, never repeated
    return summary["step"]


def not_started(run_dir: Path) -> bool:
    return not any((run_dir / name).exists() for name in ("metrics.json", "metrics.jsonl", "checkpoints"))


def started_sweep(tmp_path, reaper, launcher: str, seeds: int, running: int, new_session: bool = False,
                  jobs_at_once: int = 2):
    """A sweep of `seeds` long OPD jobs on `launcher`, once its first `running` jobs trained a step: (the command's
    process, its arguments, the job directories, every process below the command then)."""
    sweep = tmp_path / "sweep"
    workers = [f"hydra.launcher.n_jobs={jobs_at_once}"] if launcher == "joblib" else []
    args = ["-m", f"seed={','.join(map(str, range(seeds)))}", f"hydra/launcher={launcher}", *workers, *LONG,
            f"hydra.sweep.dir={sweep}"]
    proc = start([sys.executable, "-m", "kltd.app.cli", "train", *args], tmp_path, new_session=new_session)
    reaper.append(proc)
    jobs = [sweep / f"{n}_opd_s{n}" for n in range(seeds)]
    wait_until(lambda: all(trained_steps(job) for job in jobs[:running]), proc, f"{running} job(s) trained a step")
    pids = descendants(proc.pid)
    reaper.extend(pids)
    return proc, args, jobs, pids


def test_sigterm_to_a_joblib_sweep_stops_every_job_with_a_checkpoint_and_the_same_command_resumes(tmp_path, reaper):
    """Two jobs side by side, a third waiting for a worker. SIGTERM to the command: both running jobs finish
    their step, save and say interrupted; the third does not start; the command waits for them, exits 143 with
    one line naming the command that resumes; no worker is left. That command resumes both from their
    checkpoints (stopped again the same way here: the jobs are long)."""
    proc, args, jobs, pids = started_sweep(tmp_path, reaper, "joblib", seeds=3, running=2)
    proc.send_signal(signal.SIGTERM)
    _, line = stopped(proc, signal.SIGTERM, pids)
    steps = [interrupted(job, signal.SIGTERM) for job in jobs[:2]]
    assert not_started(jobs[2])
    assert "2 job(s) interrupted with a checkpoint, 1 not started; resume with: kltd train " in line
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume == ["kltd", "train", *args]  # the sweep's directory was named: the same command

    proc = start([sys.executable, "-m", "kltd.app.cli", *resume[1:]], tmp_path)
    reaper.append(proc)
    wait_until(lambda: all(len(trained_steps(job)) > step for job, step in zip(jobs, steps)), proc,
               "both jobs trained past their checkpoints")
    pids = descendants(proc.pid)
    reaper.extend(pids)
    proc.send_signal(signal.SIGTERM)
    out, _ = stopped(proc, signal.SIGTERM, pids)
    for job, step in zip(jobs, steps):
        assert f"resuming {job} from step {step} (step-{step:06d})" in out
        assert interrupted(job, signal.SIGTERM) > step and len(list((job / "checkpoints").glob("step-*"))) == 2


def test_ctrl_c_on_a_joblib_sweep_with_an_idle_worker_stops_every_job_with_a_checkpoint(tmp_path, reaper):
    """Ctrl-C in a terminal sends SIGINT to every process of the command, idle workers included (one here: three
    workers, two jobs). It used to end an idle worker, and loky then killed the others with their jobs."""
    proc, _, jobs, pids = started_sweep(tmp_path, reaper, "joblib", seeds=2, running=2, new_session=True,
                                        jobs_at_once=3)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole process group
    _, line = stopped(proc, signal.SIGINT, pids)
    assert "2 job(s) interrupted with a checkpoint;" in line
    for job in jobs:
        interrupted(job, signal.SIGINT)


def test_sigterm_to_a_sweep_run_one_job_after_another_stops_it_and_starts_no_other(tmp_path, reaper):
    proc, _, (first, second), pids = started_sweep(tmp_path, reaper, "basic", seeds=2, running=1)
    proc.send_signal(signal.SIGTERM)
    _, line = stopped(proc, signal.SIGTERM, pids)
    interrupted(first, signal.SIGTERM)
    assert not_started(second) and "1 job(s) interrupted with a checkpoint, 1 not started;" in line


def test_sigterm_to_a_submitit_local_sweep_stops_its_jobs_and_leaves_no_process(tmp_path, reaper):
    proc, _, jobs, pids = started_sweep(tmp_path, reaper, "submitit_local", seeds=2, running=2)
    proc.send_signal(signal.SIGTERM)
    stopped(proc, signal.SIGTERM, pids)
    for job in jobs:
        interrupted(job, signal.SIGTERM)


def test_a_sweep_whose_parent_is_killed_leaves_no_worker_behind(tmp_path, reaper):
    """kill -9 of the command (nothing can be passed on then): the workers see their parent gone, stop their
    jobs after the step with a checkpoint, and exit, instead of training on for nobody."""
    proc, _, jobs, pids = started_sweep(tmp_path, reaper, "joblib", seeds=2, running=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD_S)
    assert_all_gone(pids)
    for job in jobs:
        interrupted(job, signal.SIGTERM)


def signal_pending(pid: int, signum: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    pending = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signum - 1)) for mask in pending)


def test_a_second_ctrl_c_stops_a_sweep_at_once_and_leaves_no_process(tmp_path, reaper):
    """The jobs are frozen (SIGSTOP) so that they cannot stop on their own in between: the first SIGINT is
    passed on to them (it waits there), the second kills every process of the sweep; exit 130, one line."""
    proc, _, jobs, pids = started_sweep(tmp_path, reaper, "joblib", seeds=2, running=2)
    workers = [pid for pid in pids if b"popen_loky_posix" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: all(signal_pending(pid, signal.SIGINT) for pid in workers), proc, "the first was passed on")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=HANG_GUARD_S)
    assert_all_gone(pids)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("kltd: stopped at once by a second Ctrl-C")
