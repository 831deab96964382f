"""Hydra's launchers run kltd's sweeps: joblib (jobs side by side in worker processes), submitit_local
(one subprocess per job, as on a cluster), and the SLURM preset, validated by composition."""

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from kltd.app.train_command import config_dir
from kltd.spec.matrix import METHOD_NAMES

TINY = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.progress=false", "eval.num_prompts=4",
        "eval.batch_size=4", "eval.pass_k=2", "eval.max_new_tokens=24", "sampling.max_new_tokens=24",
        "data.n_train=64", "data.n_eval=8", "model.device=cpu"]


def kltd(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kltd.app.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "WANDB_MODE": "disabled"}, timeout=900)


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "basic"])
def test_the_matrix_sweep_runs_through_a_parallel_launcher(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    out = kltd("train", "sweep=matrix", f"hydra/launcher={launcher}", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "side by side" not in out.stderr  # a launcher named on the command line is the one used
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert {(s["prefix"], s["trajectory"]) for s in summaries} == set(METHOD_NAMES)
    assert all(s["status"] == "completed" for s in summaries)
    assert (sweep / "results.md").is_file() and len((sweep / "results.csv").read_text().splitlines()) == 1 + 9


def test_a_failed_job_in_worker_processes_still_fails_the_command(tmp_path):
    """With jobs in other processes the failure is read from the run directories, not from this process."""
    sweep = tmp_path / "sweep"
    out = kltd("train", "-m", "hydra/launcher=joblib", "prefix=student", "trainer.lr=1e30,0.001",
               "trainer.warmup_steps=0", "trainer.max_grad_norm=1e30", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 1 and "1 job(s) of the sweep did not complete" in out.stderr
    assert sorted(json.loads(p.read_text())["status"] for p in sweep.glob("*/metrics.json")) == ["completed", "failed"]


def test_a_sweep_without_a_gpu_runs_side_by_side_unless_told_otherwise(monkeypatch, capsys):
    from kltd.app.train_command import side_by_side
    from kltd.spec.config import Config

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
