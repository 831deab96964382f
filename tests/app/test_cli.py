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
