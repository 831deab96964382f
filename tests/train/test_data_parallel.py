"""Data parallelism (kltd.train.data_parallel) against one process, on the CPU with gloo: N processes with
B/N rows each take the steps one process takes with B rows, and a run resumes on another process count."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kltd.spec.config import Config, ConfigError
from kltd.train.job import train_job
from kltd.train.trainer import TrainingError


def config(prefix: str, trajectory: str, *, nproc: int, cache: Path, accum: int = 1, steps: int = 5,
           **trainer) -> Config:
    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor = prefix, trajectory
    cfg.model.device, cfg.wandb.mode, cfg.cache.dir = "cpu", "disabled", str(cache)
    cfg.data.n_train, cfg.data.n_eval = 200, 8
    cfg.eval.num_prompts, cfg.eval.batch_size, cfg.eval.pass_k, cfg.eval.before = 4, 4, 2, False
    cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.grad_accum = steps, 8, accum
    cfg.trainer.log_every, cfg.trainer.progress, cfg.trainer.lr = 1, False, 3e-3
    cfg.distributed.nproc_per_node = nproc
    for key, value in trainer.items():
        setattr(cfg.trainer, key, value)
    return cfg


def trained(cfg: Config, run_dir: Path) -> tuple[list[float], dict]:
    train_job(cfg, run_dir)
    return losses(run_dir), load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def assert_same_run(a: tuple[list[float], dict], b: tuple[list[float], dict], relative: bool = False) -> None:
    """Losses within 1e-5 (relative: 1e-5 of the loss, for losses of tens of nats), weights within 1e-5."""
    assert len(a[0]) == len(b[0]) >= 5
    assert max(abs(x - y) / (max(1.0, abs(x)) if relative else 1.0) for x, y in zip(a[0], b[0])) < 1e-5, (a[0], b[0])
    assert a[1].keys() == b[1].keys()
    assert max(float((a[1][k] - b[1][k]).abs().max()) for k in a[1]) < 1e-5


@pytest.mark.parametrize("prefix,trajectory,accum", [("fixed", "expert", 1), ("fixed", "expert", 2),
                                                     ("student", "student", 1), ("student", "student", 2)])
def test_two_processes_take_the_steps_of_one(tmp_path, prefix, trajectory, accum):
    one = trained(config(prefix, trajectory, nproc=1, accum=accum, cache=tmp_path / "c1"), tmp_path / "one")
    two = trained(config(prefix, trajectory, nproc=2, accum=accum, cache=tmp_path / "c2"), tmp_path / "two")
    assert_same_run(one, two)
    start = load_file(str(_toy_student() / "model.safetensors"))
    assert max(float((two[1][k] - start[k]).abs().max()) for k in start) > 1e-3  # the steps did train
    summary = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["eval_after"]["accuracy"] >= 0
    assert summary["tokens"]["trained"] == json.loads((tmp_path / "one" / "metrics.json").read_text())["tokens"][
        "trained"]


@pytest.mark.parametrize("method", ["minillm", "offline_rl_filter"])
def test_terms_that_compare_a_row_with_the_whole_batch_span_the_processes(tmp_path, method):
    """The prefix term's batch_mean baseline and offline RL's filter weights see every process's rows."""
    def cfg(nproc):
        c = config("student" if method == "minillm" else "fixed", "student" if method == "minillm" else "dataset",
                   nproc=nproc, cache=tmp_path / f"c{nproc}")
        if method == "minillm":
            c.loss.kl_prefix_weight, c.loss.baseline, c.loss.normalization = 1.0, "batch_mean", "sequence"
        else:
            c.trajectory.reward, c.trajectory.weighting, c.trajectory.keep_fraction = "teacher_loglik", "filter", 0.25
        return c

    # MiniLLM's sequence-normalised losses run to tens of nats: equal to float32's precision, not to 1e-5 absolute
    assert_same_run(trained(cfg(1), tmp_path / "one"), trained(cfg(2), tmp_path / "two"), relative=True)


def _toy_student() -> Path:
    from kltd.train.models import resolve_model_path

    return Path(resolve_model_path(Config().model.student))


def test_a_run_resumes_on_another_number_of_processes(tmp_path):
    def cfg(nproc):
        return config("student", "student", nproc=nproc, steps=6, cache=tmp_path / "c", checkpoint_every=3,
                      keep_checkpoints=3)

    whole = trained(cfg(1), tmp_path / "whole")
    cut = tmp_path / "cut"  # the same run as if stopped after its step-3 checkpoint
    shutil.copytree(tmp_path / "whole", cut)
    for done in (cut / "metrics.json", cut / "checkpoint", cut / "checkpoints" / "step-000006"):
        shutil.rmtree(done) if done.is_dir() else done.unlink()
    resumed = trained(cfg(2), cut)
    assert_same_run(whole, resumed)
    assert json.loads((cut / "metrics.json").read_text())["resumed_from_step"] == 3


def test_a_failure_in_the_processes_is_one_line_and_a_failed_summary(tmp_path):
    cfg = config("student", "student", nproc=2, cache=tmp_path / "c", lr=1e30, warmup_steps=0, max_grad_norm=1e30)
    with pytest.raises(TrainingError, match="at step") as failure:
        train_job(cfg, tmp_path / "run")
    assert "\n" not in str(failure.value)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("change,message", [
    (lambda c: setattr(c.trainer, "batch_size", 6), "multiple of distributed.nproc_per_node=4"),
    (lambda c: (setattr(c.loss, "kl_prefix_weight", 1.0), setattr(c.prefix, "source", "mixed")), "unevenly"),
    (lambda c: setattr(c.model, "teacher_device", "cpu"), "teacher_device"),
])
def test_what_data_parallelism_cannot_take_is_refused_before_anything_runs(change, message):
    cfg = config("student", "student", nproc=4, cache=Path("unused"))
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        cfg.check()


def test_each_process_takes_its_own_rows_of_the_global_batch():
    from kltd.train.ranks import Ranks

    assert [list(Ranks(r, 4).share(8)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(Ranks().share(8)) == list(range(8))
