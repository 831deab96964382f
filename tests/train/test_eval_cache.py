"""The evaluation before training is computed once per student, data and evaluation settings (kltd.train.
eval_cache): a second run reuses the figures of the first exactly, without evaluating; a changed input
gets its own entry; an unreadable entry is evaluated again."""

import dataclasses
import json
from pathlib import Path

import pytest

import kltd.train.evaluation as evaluation
from kltd.schema.config import Config
from kltd.train.eval_cache import EvalInputs, cached_evaluation
from kltd.train.job import train_job


def config(cache: Path, trajectory: str = "expert") -> Config:
    cfg = Config()
    cfg.trajectory.supervisor = trajectory
    cfg.model.device, cfg.wandb.mode, cfg.cache.dir = "cpu", "disabled", str(cache)
    cfg.data.n_train, cfg.data.n_eval = 64, 8
    cfg.eval.num_prompts, cfg.eval.batch_size, cfg.eval.pass_k = 8, 8, 2
    cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.progress = 2, 4, False
    cfg.trainer.save_checkpoint = False
    return cfg


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = evaluation.evaluate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", counting)
    return calls


def test_a_second_cell_reuses_the_evaluation_before_training_exactly(tmp_path, counted):
    first = train_job(config(tmp_path / "cache"), tmp_path / "sft")
    assert len(counted) == 2  # before and after
    second = train_job(config(tmp_path / "cache", trajectory="student"), tmp_path / "teacher-prefix-free")
    assert len(counted) == 3  # after only: before came from the cache
    assert second["eval_before"] == first["eval_before"]
    assert second["eval_before"]["accuracy"] >= 0 and second["phases"]["evaluation"] > 0
    fresh = config(tmp_path / "other-cache")
    fresh.cache.eval_before = False
    # exactly equal: the same evaluation of the same weights, the same float32 operations in the same order
    assert train_job(fresh, tmp_path / "uncached")["eval_before"] == first["eval_before"]
    assert len(counted) == 5


def test_changed_inputs_get_their_own_entry_and_a_torn_one_is_evaluated_again(tmp_path):
    cfg, model = config(tmp_path), tmp_path / "model"
    model.mkdir()
    inputs = EvalInputs(student_dir=str(model), teacher_dir=str(model),
                        examples=[], checker="addition", settings=cfg.eval, dtype="float32", device="cpu",
                        paths={"student": {"packed": True, "decoder": "lean"}})
    assert inputs.digest() == dataclasses.replace(inputs, settings=dataclasses.replace(cfg.eval, every=5)).digest()
    for change in (dict(checker="exact"), dict(paths={"student": {"packed": False, "decoder": "forward"}}),
                   dict(dtype="bfloat16"),
                   dict(settings=dataclasses.replace(cfg.eval, num_prompts=4)),
                   dict(exact={"n_states": 6, "horizon": 6}), dict(exact={"n_states": 6, "horizon": 5})):
        assert dataclasses.replace(inputs, **change).digest() != inputs.digest()
    # data=markov's exact figures enter the key through `exact`; the switch itself changes no other evaluation's key
    assert dataclasses.replace(inputs, exact={"horizon": 6}).digest() != dataclasses.replace(
        inputs, exact={"horizon": 5}).digest()
    assert inputs.digest() == dataclasses.replace(inputs, settings=dataclasses.replace(cfg.eval, exact_kl=True)).digest()
    (model / "model.safetensors").write_bytes(b"weights")
    changed_student = inputs.digest()
    (model / "model.safetensors").write_bytes(b"other weights")
    assert inputs.digest() != changed_student

    lines = []
    assert cached_evaluation(inputs, lambda: {"accuracy": 0.5}, tmp_path / "c", lines.append) == {"accuracy": 0.5}
    assert cached_evaluation(inputs, lambda: {"accuracy": 0.0}, tmp_path / "c", lines.append) == {"accuracy": 0.5}
    (entry,) = (tmp_path / "c").glob("eval-before-*.json")
    entry.write_text('{"accuracy": 0.')  # torn
    assert cached_evaluation(inputs, lambda: {"accuracy": 0.25}, tmp_path / "c", lines.append) == {"accuracy": 0.25}
    assert json.loads(entry.read_text()) == {"accuracy": 0.25}
    assert any("unreadable" in line for line in lines)
