"""The command line as a user meets it: help, refusals before any model loads, one clear line, no traceback."""

import json
import os
import subprocess
import sys

import pytest

from kltd.train.models import assets_dir

KLTD = [sys.executable, "-m", "kltd.app.cli"]
# A hang guard, not a measure of speed: some of these commands would train if their refusal were missing, and a
# loaded machine may take minutes to import torch and transformers. How early a refusal comes is checked by
# what the process did (run_audited), never by the clock.
HANG_GUARD_S = 900


def run(*args, cwd=None, timeout=HANG_GUARD_S):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([*KLTD, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


# `kltd` under an audit hook (PEP 578; it sees the process's own Python-level calls, not its children's): the
# files it opens under the watched directories (a model cannot load without transformers reading its
# config.json from Python), every attempt to reach the network (socket.getaddrinfo, socket.connect) and every
# time.sleep (a retry's back-off), written as JSON to AUDIT_RECORD when the process exits.
AUDITED_CLI = r"""
import atexit, json, os, runpy, sys
record = os.environ["AUDIT_RECORD"]
watched = [os.path.realpath(p) for p in os.environ["AUDIT_WATCH"].split(os.pathsep) if p]
seen = {"opened": [], "network": [], "slept": []}

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if any(path == w or path.startswith(w + os.sep) for w in watched):
            seen["opened"].append(path)
    elif event == "socket.getaddrinfo":
        seen["network"].append(f"getaddrinfo {args[0]}:{args[1]}")
    elif event == "socket.connect":
        seen["network"].append(f"connect {args[1]}")
    elif event == "time.sleep":
        seen["slept"].append(args[0])

def write():
    with open(record, "w") as f:
        json.dump(seen, f)

atexit.register(write)
sys.addaudithook(hook)
sys.argv = ["kltd", *sys.argv[1:]]
runpy.run_module("kltd.app.cli", run_name="__main__", alter_sys=True)
"""


def run_audited(*args, cwd, watch=(), env=None) -> tuple[subprocess.CompletedProcess, dict]:
    """`kltd *args` and what it did: {"opened": files under `watch`, "network": attempts, "slept": seconds}."""
    record = cwd / "audit.json"
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {}), "AUDIT_RECORD": str(record),
           "AUDIT_WATCH": os.pathsep.join(str(w) for w in watch)}
    out = subprocess.run([sys.executable, "-c", AUDITED_CLI, *args], capture_output=True, text=True, cwd=cwd,
                         env=env, timeout=HANG_GUARD_S)
    assert record.is_file(), f"the audited command left no record (exit {out.returncode}): {out.stderr[-2000:]}"
    seen = json.loads(record.read_text())
    record.unlink()
    return out, seen


def test_top_level_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    assert "train" in out.stdout and "compare" in out.stdout


def test_train_help_lists_the_axes(tmp_path):
    out = run("train", "--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "prefix: fixed, mixed, student, teacher" in out.stdout
    assert "trajectory: dataset, expert, student" in out.stdout


@pytest.mark.parametrize("args", [["prefix=student", "trajectory=dataset"], ["-m", "prefix=fixed,teacher", "trajectory=dataset"]])
def test_invalid_cell_is_refused_fast_with_one_line(tmp_path, args):
    """Fast means before any model loads (whatever the machine's load): no file of a shipped pair is
    opened, and nothing waits on the network."""
    out, seen = run_audited("train", *args, cwd=tmp_path, watch=[assets_dir()])
    assert out.returncode != 0
    assert seen == {"opened": [], "network": [], "slept": []}, seen
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "dataset has no next token" in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "outputs").exists()  # refused before any run directory was made


def test_missing_model_directory_is_a_one_line_error(tmp_path):
    out = run("train", f"model.student={tmp_path}/nope", cwd=tmp_path)
    assert out.returncode != 0
    assert "model.student" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def one_line_error(out) -> str:
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kltd: error: "), out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    return lines[0]


def test_typo_in_an_axis_lists_the_options_in_one_line(tmp_path):
    line = one_line_error(run("train", "prefix=studnet", cwd=tmp_path))
    assert "prefix=studnet" in line and "fixed, mixed, student, teacher" in line


@pytest.mark.parametrize("args,words", [
    (["trajectory=expert", "loss.divergence=reverse_kl"], "trajectory=student"),
    (["prefix=student", "trajectory=student", "loss.divergence=forward_kl"], "trajectory=expert"),
    (["trainer.max_stpes=5"], "max_stpes"),
])
def test_refusals_are_one_line(tmp_path, args, words):
    assert words in one_line_error(run("train", *args, cwd=tmp_path))
    assert not (tmp_path / "outputs").exists()


def test_a_preset_sweep_is_checked_job_by_job_before_any_runs(tmp_path):
    """sweep=corners sweeps the axes in its preset; with cache.teacher=on two of its jobs are invalid,
    and the refusal comes before any job has run (Hydra's own expansion of the preset's parameters)."""
    line = one_line_error(run("train", "sweep=corners", "cache.teacher=on", cwd=tmp_path))
    assert "cache.teacher=on" in line and "prefix=student" in line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("spelling", ["method=sft", "+method=sft"])
def test_optional_groups_work_as_help_lists_them(tmp_path, spelling):
    out = run("train", spelling, "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "source: fixed" in out.stdout and "supervisor: expert" in out.stdout


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = run("train", "prefix=student", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0
    assert "source: student" in out.stdout


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (tmpfs mounted ro; root only): None where this process may not mount one."""
    import subprocess

    mount_point = tmp_path / "read-only"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount_point)], capture_output=True)
    yield mount_point if made.returncode == 0 else None
    if made.returncode == 0:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.parametrize("args,words", [
    (["hydra.run.dir=/proc/kltd-run"], "hydra.run.dir: '/proc/kltd-run' cannot be created: '/proc' takes no new"),
    (["-m", "seed=0,1", "hydra.sweep.dir=/proc/kltd-sweep/x"], "hydra.sweep.dir: '/proc/kltd-sweep/x' cannot be "
                                                              "created: '/proc' takes no new"),
    (["hydra.run.dir=/proc/self/kltd"], "hydra.run.dir: '/proc/self/kltd' cannot be created"),
    (["hydra.run.dir=/dev/null/x"], "hydra.run.dir: '/dev/null/x' cannot be a directory: '/dev/null' is a file"),
    (["hydra.run.dir=READ_ONLY/run"], "cannot be created: 'READ_ONLY' takes no new directories (Read-only file "
                                      "system)"),
])
def test_an_output_directory_where_nothing_can_be_made_is_one_line(tmp_path, read_only_dir, args, words):
    """os.access says yes for /proc as root; Hydra then failed with a traceback. Now the directory is tried."""
    if any("READ_ONLY" in a for a in args):
        if read_only_dir is None:
            pytest.skip("cannot mount a read-only file system here (not root?)")
        args, words = [a.replace("READ_ONLY", str(read_only_dir)) for a in args], words.replace("READ_ONLY",
                                                                                               str(read_only_dir))
    line = one_line_error(run("train", *args, "trainer.max_steps=1", cwd=tmp_path))
    assert words in line
    assert not (tmp_path / "outputs").exists() and list(tmp_path.iterdir()) == [tmp_path / "read-only"]
