"""Every valid cell composes into a typed config; every invalid one is refused with a reason."""

import itertools

import pytest
from hydra import compose, initialize_config_dir

from kltd.schema.config import Config, ConfigError, validate
from kltd.schema.matrix import METHOD_NAMES, PREFIXES, TRAJECTORIES, cell_error, method_name, slug
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


# a blend and the trajectory it is filed under: the KL it weighs more, the expert's on a tie
BLENDS = [("jsd", "expert"), ("loss.divergence=jsd loss.beta=0.1", "expert"), ("loss.divergence=jsd loss.beta=0.9", "student"),
          ("kl_mix", "expert"), ("loss.divergence=kl_mix loss.mix=0.7", "student"), ("tv", "expert"),
          ("skew_kl", "expert"), ("skew_reverse_kl", "student"), ("loss.divergence=jsd_scaled loss.beta=0.6", "student")]


@pytest.mark.parametrize("divergence,home", BLENDS)
def test_a_blend_has_one_name_the_trajectory_whose_kl_it_weighs_more(divergence, home):
    """A blend computes the same loss under trajectory=expert and trajectory=student: it is filed under one of
    them, labelled there, and refused under the other with a line naming the right one."""
    overrides = divergence.split() if "=" in divergence else [f"loss.divergence={divergence}"]
    cfg = compose_typed("prefix=student", f"trajectory={home}", *overrides)
    validate(cfg)
    assert cfg.method.startswith({"expert": "DAgger [", "student": "OPD ["}[home])
    other = {"expert": "student", "student": "expert"}[home]
    with pytest.raises(ConfigError, match=f"filed under trajectory={home}.*use trajectory={home}$"):
        validate(compose_typed("prefix=student", f"trajectory={other}", *overrides))


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


# ---------------------------------------------------------------------------------------------------------
# Every accepted configuration is exact or labelled (issue 21): what is refused, in one line with a fix that
# is then accepted; what is allowed because it is exact; and approximations(), the labels of the rest.

MINILLM = ("method=minillm",)  # OPD + the prefix term: student states, sequence normalisation, batch_mean
REFUSED = [
    # (overrides, what the line must name, a fix it names, which then validates)
    (MINILLM + ("loss.baseline=leave_one_out",), "loss.baseline=leave_one_out", "loss.baseline=batch_mean"),
    (MINILLM + ("loss.baseline=leave_one_out",), "loss.baseline=leave_one_out", "loss.baseline=none"),
    (MINILLM + ("loss.normalization=token",), "loss.normalization=token", "loss.normalization=sequence"),
    (MINILLM + ("prefix=mixed", "loss.normalization=token"), "loss.normalization=token",
     "loss.normalization=sequence"),
    (("method=handoff", "loss.kl_prefix_weight=1"), "loss.normalization=token", "loss.normalization=sequence"),
    (MINILLM + ("loss.estimator=topk",), "loss.estimator=topk", "loss.estimator=exact"),
    (MINILLM + ("loss.estimator=sampled_k1",), "loss.estimator=sampled_k1", "loss.estimator=sampled_k2"),
    (MINILLM + ("loss.estimator=sampled_k3",), "loss.estimator=sampled_k3", "loss.estimator=sampled_reward"),
    # a reverse-KL value whose expected gradient is zero, or the forward KL's: refused with or without the prefix term
    (("method=opd", "loss.estimator=sampled_k1"), "expected gradient is zero", "loss.estimator=sampled_k2"),
    (("method=opd", "loss.estimator=sampled_k3"), "forward KL(p||q)'s", "loss.estimator=sampled_reward"),
    (MINILLM + ("loss.estimator=topk",), "loss.estimator=topk", "loss.kl_prefix_weight=0"),
    (("prefix=student", "trajectory=expert", "loss.kl_prefix_weight=1", "loss.normalization=sequence",
      "loss.estimator=topk"), "loss.estimator=topk", "loss.estimator=exact"),
    (MINILLM + ("sampling.backend=vllm", "sampling.vllm_sync_every=4"), "sampling.vllm_sync_every=4",
     "sampling.vllm_sync_every=1"),
    (MINILLM + ("sampling.backend=vllm", "sampling.vllm_sync_every=4"), "sampling.vllm_sync_every=4",
     "loss.kl_prefix_weight=0"),
    (("method=opd", "loss.estimator=sampled_reward", "sampling.backend=vllm", "sampling.vllm_sync_every=2"),
     "sampling.vllm_sync_every=2", "loss.estimator=exact"),
    (MINILLM + ("prefix=mixed", "distributed.nproc_per_node=2"), "loss.baseline=batch_mean", "loss.baseline=none"),
    (("method=opd", "loss.divergence=jsd", "loss.beta=0.9", "loss.estimator=sampled_k2"), "loss.estimator=sampled_k2",
     "loss.estimator=exact"),
    (("method=seqkd", "loss.estimator=sampled_reward"), "loss.estimator=sampled_reward", "loss.estimator=sampled_k1"),
    (("method=bc", "loss.estimator=topk"), "loss.estimator=topk", "loss.estimator=exact"),
]


@pytest.mark.parametrize("overrides,key,fix", REFUSED)
def test_a_refusal_is_one_line_naming_the_key_and_a_fix_that_is_accepted(overrides, key, fix):
    with pytest.raises(ConfigError) as refused:
        validate(compose_typed(*overrides))
    line = str(refused.value)
    assert "\n" not in line and key in line and fix.split("=")[0] in line and fix.split("=")[1] in line, line
    validate(compose_typed(*overrides, fix))


def test_the_data_parallel_refusal_no_longer_recommends_leave_one_out():
    with pytest.raises(ConfigError) as refused:
        validate(compose_typed(*MINILLM, "prefix=mixed", "distributed.nproc_per_node=2"))
    assert "leave_one_out" not in str(refused.value)


@pytest.mark.parametrize("overrides", [
    # the baseline of a term that is off, or of a prefix term that is cross-entropy, changes no number
    ("method=opd", "loss.baseline=leave_one_out"),
    ("method=seqkd", "loss.kl_prefix_weight=1", "loss.baseline=leave_one_out"),
    # on fixed or teacher states the prefix term is cross-entropy on the prefix: per-token normalisation and
    # any trajectory estimator are a legitimate objective there
    ("method=seqkd", "loss.kl_prefix_weight=1", "loss.normalization=token", "loss.estimator=topk"),
    ("method=gkd", "prefix.student_fraction=0", "loss.kl_prefix_weight=1"),  # a mixture with no student rows
    # the prefix term with an estimator whose expected gradient is the exact per-token one
    MINILLM + ("loss.estimator=sampled_k2",),
    MINILLM + ("loss.estimator=sampled_reward",),
    MINILLM + ("loss.kl_trajectory_weight=0", "loss.estimator=topk"),  # an unused estimator
    # stale weights where nothing assumes the current student: labelled by approximations() instead
    ("method=opd", "sampling.backend=vllm", "sampling.vllm_sync_every=4"),
    ("method=seqkd", "loss.estimator=sampled_k1", "sampling.backend=vllm", "sampling.vllm_sync_every=4"),  # teacher
])
def test_what_is_exact_or_labelled_is_accepted(overrides):
    validate(compose_typed(*overrides))


def test_the_shipped_presets_are_exact_but_for_filtered_bcs_batch_threshold():
    from kltd.schema.config import approximations

    for method in ("bc", "dagger", "distillm", "gkd", "gkd_rkl", "handoff", "minillm", "offline_rl", "opd", "seqkd",
                   "sft", "teacher_prefix_rkl"):
        assert approximations(compose_typed(f"method={method}")) == [], method
    (line,) = approximations(compose_typed("method=filtered_bc"))
    assert line.startswith("trajectory.weighting=filter:") and "micro-batch (32 rows)" in line


@pytest.mark.parametrize("overrides,starts,says", [
    (("method=opd", "loss.estimator=topk"), "loss.estimator=topk", "top 8 tokens"),
    (("method=opd", "loss.estimator=sampled_k2"), "loss.estimator=sampled_k2", "expected gradient is KL(q||p)'s"),
    (("method=seqkd", "loss.estimator=sampled_k1"), "loss.estimator=sampled_k1", "teacher's one sampled token"),
    (("method=sft", "cache.format=topk"), "cache.format=topk", "top 64 logits"),
    (("method=filtered_bc", "trajectory.weighting=awr"), "trajectory.weighting=awr", "of order 1/32"),
    (("method=opd", "sampling.top_p=0.9"), "sampling.top_p=0.9", "nucleus of the student's"),
    (("method=gkd", "prefix.other=teacher", "sampling.top_p=0.9"), "sampling.top_p=0.9", "student and teacher"),
    (("method=opd", "sampling.temperature=0.7"), "sampling.temperature=0.7", "student's"),
    (("method=dagger", "sampling.temperature=0"), "sampling.temperature=0", "greedy"),
    (("method=opd", "sampling.backend=vllm", "sampling.vllm_sync_every=4"), "sampling.vllm_sync_every=4",
     "up to 3 optimiser steps old"),
    (MINILLM + ("loss.gamma=0.9",), "loss.gamma=0.9", "discounts"),
    (MINILLM + ("loss.kl_prefix_weight=0.5",), "loss.kl_prefix_weight=0.5", "equal weights"),
    (("method=dagger", "rl=grpo"), "rl.scale=std", "not proportional to the expected reward's"),
    (("method=dagger", "rl=grpo", "rl.scale=none", "rl.kl_weight=0.1"), "rl.kl_weight=0.1", "KL(ref||q)'s"),
    (("method=dagger", "rl=grpo", "rl.scale=none", "rl.epochs=2"), "rl.epochs=2", "clipped to [0.8, 1.2]"),
])
def test_each_approximation_is_one_line_naming_its_key(overrides, starts, says):
    from kltd.schema.config import approximations

    cfg = compose_typed(*overrides)
    validate(cfg)
    (line,) = approximations(cfg)
    assert line.startswith(starts + ":") and says in line and "\n" not in line, line


@pytest.mark.parametrize("overrides", [
    ("method=bc", "cache.format=topk"),  # the cache is not used: BC needs no teacher
    ("method=sft", "sampling.top_p=0.9", "sampling.temperature=0.5"),  # nothing samples the states
    ("method=opd", "loss.gamma=0.5"),  # no prefix term
    ("method=seqkd", "loss.kl_prefix_weight=0.5"),  # teacher states: the prefix term is cross-entropy
    ("method=opd", "sampling.vllm_sync_every=4"),  # kltd's sampler always has the current weights
    ("method=opd", "rl.kl_weight=0.5", "rl.epochs=3"),  # no RL stage
    ("method=opd", "rl=grpo", "rl.scale=none", "rl.baseline=leave_one_out"),  # RLOO: unbiased
])
def test_unused_settings_are_not_labelled(overrides):
    from kltd.schema.config import approximations

    assert approximations(compose_typed(*overrides)) == []


def test_an_estimator_in_place_of_the_exact_divergence_is_in_the_label():
    """Runs with equal labels are seeds of one method: OPD with a one-token estimator is not OPD's seed."""
    assert compose_typed("method=opd", "loss.estimator=sampled_k2").method == "OPD ~sampled_k2"
    assert compose_typed("method=opd", "loss.estimator=topk", "loss.top_k=4").method == "OPD ~topk(4)"
    assert compose_typed("method=seqkd", "loss.estimator=sampled_k1").method == "SeqKD ~sampled_k1"
    assert compose_typed("method=opd").method == "OPD"
