"""`kltd make-data` writes only responses that `data=file` can train on: an empty one is left out and counted."""

import json

import kltd.train.make_data as make_data_module
from kltd.schema.config import MakeDataConfig


def test_empty_responses_are_left_out_and_counted(tmp_path, monkeypatch):
    real = make_data_module.decode_responses

    def every_other_empty(tokenizer, responses):  # as if the model had ended at once on every second prompt
        return [text if i % 2 else "" for i, text in enumerate(real(tokenizer, responses))]

    monkeypatch.setattr(make_data_module, "decode_responses", every_other_empty)
    cfg = MakeDataConfig(out=str(tmp_path / "student.jsonl"), n=8, batch_size=8)
    cfg.model.device, cfg.data.n_train, cfg.data.n_eval = "cpu", 16, 4
    lines = []
    summary = make_data_module.make_data(cfg, echo=lines.append)
    rows = [json.loads(line) for line in (tmp_path / "student.jsonl").read_text().splitlines()]
    assert len(rows) == summary["rows"] == 4 and summary["empty_left_out"] == 4
    assert all(row["completion"].strip() for row in rows)
    assert lines[-1].endswith("; 4 empty responses left out")


def test_every_model_preset_composes_for_make_data():
    """A model preset carries training settings beside its pair (conf/model/); make-data composes it all the same
    (data=markov picks model=markov, so `kltd make-data data=markov` depends on it)."""
    import importlib
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kltd.app.train_command import config_dir

    importlib.import_module("kltd.app.make_data_command")  # registers the make-data schema

    presets = sorted(p.stem for p in (Path(config_dir()) / "model").glob("*.yaml"))
    assert "markov" in presets and "pretrained" in presets
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for preset in presets:
            cfg = OmegaConf.to_object(compose("make_data", overrides=[f"model={preset}", "out=x.jsonl"]))
            assert isinstance(cfg, MakeDataConfig), preset
        markov = OmegaConf.to_object(compose("make_data", overrides=["data=markov", "out=x.jsonl"]))
        default = OmegaConf.to_object(compose("make_data", overrides=["out=x.jsonl"]))
        addition = OmegaConf.to_object(compose("make_data", overrides=["data=addition", "out=x.jsonl"]))
    assert markov.model.teacher == "markov/teacher" and markov.sampling.max_new_tokens == markov.data.markov.horizon
    markov.check()
    assert default == markov  # the default task, as kltd train's
    assert addition.data.source == "addition" and addition.model.teacher == "toy/teacher"
