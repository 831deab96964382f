"""Every valid cell composes into a typed config; every invalid one is refused with a reason."""

import itertools

import pytest
from hydra import compose, initialize_config_dir

from kltd.spec.config import Config, ConfigError, validate
from kltd.spec.matrix import METHOD_NAMES, PREFIXES, TRAJECTORIES, cell_error, method_name, slug
from kltd.app.train_command import config_dir, to_typed


def compose_typed(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return to_typed(compose("config", overrides=list(overrides)))


CELLS = list(itertools.product(PREFIXES, TRAJECTORIES))
VALID = [c for c in CELLS if cell_error(*c) is None]
INVALID = [c for c in CELLS if cell_error(*c) is not None]


def test_the_matrix_has_nine_valid_cells_and_three_invalid():
    assert len(VALID) == 9 and sorted(INVALID) == [("mixed", "dataset"), ("student", "dataset"), ("teacher", "dataset")]


@pytest.mark.parametrize("prefix,trajectory", VALID)
def test_every_valid_cell_composes_and_validates(prefix, trajectory):
    cfg = compose_typed(f"prefix={prefix}", f"trajectory={trajectory}")
    assert isinstance(cfg, Config)
    assert (cfg.prefix.source, cfg.trajectory.supervisor) == (prefix, trajectory)
    validate(cfg)
    assert cfg.method.split(" λ=")[0] == METHOD_NAMES[(prefix, trajectory)]


@pytest.mark.parametrize("prefix,trajectory", INVALID)
def test_every_invalid_cell_is_refused_with_a_reason(prefix, trajectory):
    cfg = compose_typed(f"prefix={prefix}", f"trajectory={trajectory}")
    with pytest.raises(ConfigError, match="dataset has no next token"):
        validate(cfg)


def test_corner_names_follow_the_design_table():
    assert [method_name(p, t) for p, t in [("fixed", "expert"), ("fixed", "student"), ("student", "expert"), ("student", "student")]] == [
        "SFT", "Offline RL", "DAgger", "OPD"]
    assert slug("Offline RL") == "offline-rl"
    assert method_name("fixed", "dataset", reward="correctness") != method_name("fixed", "dataset")


def test_unknown_key_is_refused_with_its_name():
    with pytest.raises(Exception, match="max_stpes"):
        compose_typed("trainer.max_stpes=3")


def test_bad_value_type_is_refused():
    with pytest.raises(Exception, match="max_steps"):
        compose_typed("trainer.max_steps=abc")


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.divergence=fwd", "loss.divergence"),
        ("loss.normalization=batch", "loss.normalization"),
        ("prefix.student_fraction=1.5", "student_fraction"),
        ("eval.num_prompts=100000", "eval.num_prompts"),
        ("trainer.batch_size=0", "trainer.batch_size"),
    ],
)
def test_bad_values_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_typed(override))


def test_preflight_names_a_missing_model_directory():
    from kltd.train.preflight import preflight

    cfg = compose_typed("model.student=/nonexistent/model")
    validate(cfg)  # the config itself is fine: only preflight reads the file system
    with pytest.raises(ConfigError, match="model.student.*does not exist"):
        preflight(cfg)


def test_scripts_can_rely_on_these_keys():
    cfg = compose_typed("seed=3", "trainer.max_steps=7", "trainer.batch_size=5", "eval.num_prompts=11")
    assert (cfg.seed, cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.eval.num_prompts) == (3, 7, 5, 11)


@pytest.mark.parametrize("trajectory,divergence,right", [
    ("expert", "reverse_kl", "trajectory=student"),
    ("student", "forward_kl", "trajectory=expert"),
    ("expert", "loss.divergence=jsd loss.beta=1", "trajectory=student"),  # TRL's beta=1 is exactly reverse KL
    ("student", "loss.divergence=kl_mix loss.mix=0", "trajectory=expert"),
])
def test_a_divergence_that_contradicts_its_trajectory_is_refused_naming_the_right_one(trajectory, divergence, right):
    overrides = divergence.split() if "=" in divergence else [f"loss.divergence={divergence}"]
    with pytest.raises(ConfigError, match=right):
        validate(compose_typed("prefix=student", f"trajectory={trajectory}", *overrides))


@pytest.mark.parametrize("divergence", ["jsd", "kl_mix", "tv", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("trajectory", ["expert", "student"])
def test_blends_are_allowed_on_either_trajectory_and_labelled(trajectory, divergence):
    cfg = compose_typed("prefix=student", f"trajectory={trajectory}", f"loss.divergence={divergence}")
    validate(cfg)
    assert f"[{divergence}" in cfg.method


def test_the_divergence_group_sets_the_trajectory_its_kl_direction_stands_for():
    opd = compose_typed("prefix=student", "divergence=reverse_kl")
    dagger = compose_typed("prefix=student", "divergence=forward_kl")
    assert (opd.trajectory.supervisor, opd.method) == ("student", "OPD")
    assert (dagger.trajectory.supervisor, dagger.method) == ("expert", "DAgger")
    mix = compose_typed("prefix=student", "divergence=kl_mix")
    assert mix.method == "DAgger [kl_mix(0.5)]"


def test_sampled_estimators_refuse_states_drawn_from_another_distribution():
    with pytest.raises(ConfigError, match="top_p"):
        validate(compose_typed("prefix=student", "trajectory=student", "loss.estimator=sampled_reward",
                               "sampling.top_p=0.8"))
    validate(compose_typed("prefix=student", "trajectory=student", "loss.estimator=sampled_reward"))
