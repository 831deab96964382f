"""The command line as a user meets it: help, refusals in seconds, one clear line, no traceback."""

import os
import subprocess
import sys
import time

import pytest

KLTD = [sys.executable, "-m", "kltd.app.cli"]


def run(*args, cwd=None, timeout=120):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([*KLTD, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


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
    start = time.perf_counter()
    out = run("train", *args, cwd=tmp_path)
    assert out.returncode != 0
    assert time.perf_counter() - start < 30
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "dataset has no next token" in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "outputs").exists()  # refused before any run directory was made


def test_missing_model_directory_is_a_one_line_error(tmp_path):
    out = run("train", f"model.student={tmp_path}/nope", cwd=tmp_path)
    assert out.returncode != 0
    assert "model.student" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_typo_in_an_axis_lists_the_options(tmp_path):
    out = run("train", "prefix=studnet", cwd=tmp_path)
    assert out.returncode != 0
    assert "Available options in 'prefix'" in out.stderr and "student" in out.stderr
    assert "Traceback" not in out.stderr


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = run("train", "prefix=student", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0
    assert "source: student" in out.stdout
