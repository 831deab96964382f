"""A resume is refused only for settings that change the result; a setting added to kltd since the run started
counts as its default."""

import dataclasses

import pytest

from kltd.schema.config import Config, ConfigError
from kltd.train.job import check_resumable


def test_a_key_the_saved_config_lacks_counts_as_its_default(tmp_path):
    saved = dataclasses.asdict(Config())
    del saved["data"]["bad_rows"]  # a run made before data.bad_rows existed
    check_resumable(saved, dataclasses.asdict(Config()), tmp_path)
    changed = Config()
    changed.data.bad_rows = "drop"
    with pytest.raises(ConfigError, match=r"data.bad_rows='drop' \(was 'error'\)"):
        check_resumable(saved, dataclasses.asdict(changed), tmp_path)


def test_reporting_keys_may_change_and_others_may_not(tmp_path):
    saved, current = dataclasses.asdict(Config()), Config()
    current.wandb.mode, current.trainer.progress_every_s = "offline", 5.0
    check_resumable(saved, dataclasses.asdict(current), tmp_path)
    current.trainer.lr = 0.5
    with pytest.raises(ConfigError, match="trainer.lr=0.5"):
        check_resumable(saved, dataclasses.asdict(current), tmp_path)


def test_evaluation_sets_the_run_does_not_use_are_not_part_of_it(tmp_path):
    """A run made before the benchmark sets existed resumes with them in the catalog; a set it evaluates on may
    not change."""
    from kltd.schema.config import EvalSetConfig

    saved, current = dataclasses.asdict(Config()), Config()
    current.eval_sets["gsm8k"] = EvalSetConfig(source="hub", path="openai/gsm8k", checker="gsm8k")
    check_resumable(saved, dataclasses.asdict(current), tmp_path)
    current.eval.sets = ["heldout", "gsm8k"]
    with pytest.raises(ConfigError, match="eval.sets"):
        check_resumable(saved, dataclasses.asdict(current), tmp_path)
