"""Every shipped preset composes, validates, and runs a few steps on the default (Markov) pair."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kltd.schema.config import validate
from kltd.app.train_command import config_dir, to_typed

CONF = Path(config_dir())
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))
TINY = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.progress=false", "eval.num_prompts=4",
        "eval.batch_size=4", "eval.pass_k=2", "data.n_train=64", "data.n_eval=8", "model.device=cpu"]


def composed(*overrides, hydra_node=True):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_node)


def typed(*overrides):
    return to_typed(composed(*overrides, hydra_node=False))


@pytest.mark.parametrize("method", METHODS)
def test_method_preset_composes_and_validates(method):
    validate(typed(f"method={method}"))


def test_presets_name_what_they_compute():
    labels = {method: typed(f"method={method}").method for method in METHODS}
    assert labels["sft"] == "SFT" and labels["dagger"] == "DAgger" and labels["opd"] == "OPD"
    assert labels["minillm"] == "OPD +prefix(1)"
    assert labels["distillm"] == "GKD λ=0.5 [skew_kl(0.1)]"
    assert labels["handoff"] == "GKD hand-off λ=1"
    assert labels["filtered_bc"] == "Offline RL (reward-weighted)"
    assert len(set(labels.values())) == len(labels)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_presets_are_multiruns_over_valid_cells(sweep):
    cfg = composed(f"sweep={sweep}")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params, "a sweep preset must sweep something"


def test_matrix_sweep_covers_every_valid_cell():
    from kltd.schema.matrix import METHOD_NAMES

    cells = str(composed("sweep=matrix").hydra.sweeper.params["method"]).split(",")
    got = set()
    for cell in cells:
        cfg = composed(f"method={cell}")
        got.add((cfg.prefix.source, cfg.trajectory.supervisor))
    assert got == set(METHOD_NAMES)


def test_every_method_preset_runs_a_few_steps(tmp_path):
    if not METHODS:
        pytest.fail("no method presets found")
    responses = tmp_path / "responses.jsonl"
    # filtered_bc needs imperfect data: a tiny file with one wrong response
    responses.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "12+45=", "response": "57;57"}, {"prompt": "3+4+5=", "response": "7,13;13"},
        {"prompt": "10+10=", "response": "20;20"}, {"prompt": "1+1+1=", "response": "2,3;3"}]) + "\n")
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "kltd.app.cli", "train", "-m", f"method={','.join(m for m in METHODS if m != 'filtered_bc')}",
         *TINY, f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run(
        [sys.executable, "-m", "kltd.app.cli", "train", "method=filtered_bc", "data=addition",  # the file's task
         f"data.responses_file={responses}", *TINY, f"hydra.run.dir={tmp_path / 'filtered'}"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"},
        timeout=900)  # a hang guard (as the sweep's above), not a measure of speed
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in [*sweep.glob("*/metrics.json"), tmp_path / "filtered/metrics.json"]]
    assert len(summaries) == len(METHODS)
    assert all(s["status"] == "completed" for s in summaries)


MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


def task_of(model: str) -> str:
    """The data preset a model preset goes with: the shipped pairs' own tasks, a benchmark for a pretrained pair."""
    return {"toy": "data=addition", "markov": "data=markov"}.get(model, "data=gsm8k")


@pytest.mark.parametrize("model", MODELS)
def test_every_model_preset_composes_and_names_a_pair(model):
    named = ["model.teacher=some/teacher", "model.student=some/student"] if model == "pretrained" else []
    cfg = typed(f"model={model}", task_of(model), *named)
    validate(cfg)
    assert cfg.model.teacher and cfg.model.student and cfg.model.teacher != cfg.model.student


@pytest.mark.parametrize("model", [m for m in MODELS if m not in ("toy", "markov")])  # the shipped, tiny pairs
def test_presets_for_pretrained_pairs_carry_their_own_training_settings(model):
    """The toy pair's defaults (lr 1e-3, 64-token answers, 800-row evaluation batches) are not applied to a real
    pair by its preset; the command line still overrides them."""
    from kltd.schema.config import Config

    named = ["model.teacher=some/teacher", "model.student=some/student"] if model == "pretrained" else []
    cfg, toy = typed(f"model={model}", task_of(model), *named), Config()
    assert cfg.trainer.lr <= 1e-5 < toy.trainer.lr
    assert cfg.sampling.max_new_tokens > toy.sampling.max_new_tokens
    assert cfg.eval.batch_size < toy.eval.batch_size
    assert typed(f"model={model}", task_of(model), *named, "trainer.lr=3e-6").trainer.lr == 3e-6


def test_the_generic_pretrained_preset_needs_both_models_named():
    from kltd.schema.config import ConfigError

    with pytest.raises(ConfigError, match="model.teacher is empty"):
        validate(typed("model=pretrained"))


@pytest.mark.parametrize("data", DATA)
def test_every_data_preset_composes_and_validates(data, tmp_path):
    extra = [f"data.path={tmp_path}"] if data in ("file", "hub") else []
    cfg = typed(f"data={data}", *extra)
    validate(cfg)
    assert cfg.data.source in ("addition", "markov", "file", "hub")


def test_the_default_task_is_the_markov_task_and_addition_keeps_the_toy_pair():
    """conf/config.yaml picks data=markov, whose preset picks model=markov; data=addition leaves model=toy, the
    config's own model default; kltd eval composes the same defaults."""
    import importlib

    from omegaconf import OmegaConf

    importlib.import_module("kltd.app.eval_command")  # registers kltd eval's schema

    default, addition = typed(), typed("data=addition")
    validate(default)
    validate(addition)
    assert (default.data.source, default.model.teacher, default.model.student) == \
        ("markov", "markov/teacher", "markov/student")
    assert default.eval.max_new_tokens == default.sampling.max_new_tokens == default.data.markov.horizon
    assert (addition.data.source, addition.model.teacher, addition.model.student) == \
        ("addition", "toy/teacher", "toy/student")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        evaluation = OmegaConf.to_object(compose("eval"))
    assert (evaluation.data.source, evaluation.model.teacher) == ("markov", "markov/teacher")


def test_file_and_hub_data_without_a_path_are_refused_with_an_example():
    from kltd.schema.config import ConfigError

    for data in ("file", "hub"):
        with pytest.raises(ConfigError, match=f"data={data} needs data.path"):
            validate(typed(f"data={data}"))
