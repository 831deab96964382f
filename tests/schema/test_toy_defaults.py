"""A run on its own pair is told which defaults tuned for the toy pair it kept."""

from kltd.schema.config import Config
from kltd.schema.toy_defaults import toy_defaults_kept, toy_defaults_line


def own_pair() -> Config:
    cfg = Config()
    cfg.model.teacher, cfg.model.student = "/models/teacher-135m", "/models/student-cut"
    return cfg


def test_an_own_pair_with_the_toy_preset_keeps_the_toy_defaults():
    kept = toy_defaults_kept(own_pair(), "toy", given=set())
    assert kept == ["trainer.lr=0.001", "trainer.batch_size=32", "sampling.max_new_tokens=64",
                    "eval.max_new_tokens=64", "eval.batch_size=200"]
    line = toy_defaults_line(kept)
    assert "trainer.lr=0.001" in line and "model=pretrained" in line and "\n" not in line


def test_the_rl_stage_learning_rate_is_listed_where_the_stage_runs():
    cfg = own_pair()
    cfg.rl.algorithm = "grpo"
    assert toy_defaults_kept(cfg, "toy", given=set())[-1] == "rl.lr=3e-05"


def test_settings_given_on_the_command_line_are_not_listed():
    kept = toy_defaults_kept(own_pair(), "toy", given={"trainer.lr", "eval.batch_size"})
    assert "trainer.lr=0.001" not in kept and "eval.batch_size=200" not in kept and len(kept) == 3
    assert toy_defaults_line(kept[:1]).count(" is the toy pair's default;") == 1


def test_nothing_to_say_for_the_toy_pair_or_a_real_preset():
    assert toy_defaults_kept(Config(), "toy", given=set()) == []
    assert toy_defaults_kept(own_pair(), "pretrained", given=set()) == []
    assert toy_defaults_kept(own_pair(), "qwen3_8b_to_0_6b", given=set()) == []
