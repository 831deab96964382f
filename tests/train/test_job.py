"""A job leaves nothing behind in the process: its models are freed, the thread count is restored."""

import gc
import weakref

import torch

import kltd.train.models as models
from kltd.schema.config import Config
from kltd.train.job import train_job


def tiny_config(**trainer) -> Config:
    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor = "student", "student"  # samples: the lean decoder arranges weights
    cfg.model.device, cfg.wandb.mode, cfg.cache.teacher = "cpu", "disabled", "off"
    cfg.data.n_train, cfg.data.n_eval = 32, 8
    cfg.eval.num_prompts, cfg.eval.batch_size, cfg.eval.pass_k = 4, 4, 2
    cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.progress = 2, 4, False
    cfg.trainer.save_checkpoint = False
    for key, value in trainer.items():
        setattr(cfg.trainer, key, value)
    return cfg


def test_models_are_freed_after_their_job(tmp_path, monkeypatch):
    loaded = []
    plain = models.load_pair

    def watched(*args, **kwargs):
        pair = plain(*args, **kwargs)
        loaded.extend(weakref.ref(m) for m in (pair.teacher, pair.student))
        return pair

    monkeypatch.setattr(models, "load_pair", watched)
    for attempt in range(2):  # what a one-process sweep does: job after job
        train_job(tiny_config(), tmp_path / f"run{attempt}")
    gc.collect()
    assert len(loaded) == 4 and all(ref() is None for ref in loaded)


def test_a_job_restores_the_thread_count_it_found(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        plain = torch.set_num_threads

        def spy(n):
            seen.append(n)
            plain(n)

        torch.set_num_threads = spy
        try:
            train_job(tiny_config(num_threads=0), tmp_path / "run")  # the toy pair is small: one thread
        finally:
            torch.set_num_threads = plain
        assert seen[0] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_secrets_do_not_reach_the_saved_summary(tmp_path, monkeypatch):
    import dataclasses
    import json

    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    cfg = tiny_config()
    cfg.wandb.entity = "0123456789abcdef"  # e.g. pulled in by ${oc.env:WANDB_API_KEY} by mistake
    train_job(cfg, tmp_path / "run", config_dict=dataclasses.asdict(cfg))
    saved = (tmp_path / "run" / "metrics.json").read_text()
    assert "0123456789abcdef" not in saved and json.loads(saved)["config"]["wandb"]["entity"] == "<redacted>"
