"""The training horizon over training (sampling.length_schedule, kltd.rollout.horizon): the schedules at their ends,
the gate's rule, its checks and label, and toy runs whose sampled states and logs follow it."""

import json

import pytest

from kltd.rollout.horizon import Horizon
from kltd.schema.config import Config, ConfigError, SamplingConfig


def gated(*lengths: int, entropy_min: float = 0.3) -> Horizon:
    return Horizon.of(SamplingConfig(length_schedule="entropy_gated", lengths=list(lengths), entropy_min=entropy_min))


def test_steps_uses_each_length_from_its_step_on():
    h = Horizon.of(SamplingConfig(length_schedule="steps", lengths=[8, 16, 4], length_steps=[3, 5]))
    assert [h.length(step) for step in range(1, 8)] == [8, 8, 16, 16, 4, 4, 4]
    assert h.gate(4, 10.0) is None  # a step schedule has no gate


def test_fixed_is_max_new_tokens_throughout():
    h = Horizon.of(SamplingConfig(max_new_tokens=48))
    assert not h.scheduled and {h.length(s) for s in (1, 100)} == {48} and h.record(100) is None


def test_the_gate_advances_at_or_above_h_min_and_stays_below():
    h = gated(8, 16, 32, entropy_min=0.3)
    assert h.length(1) == 8
    stay = h.gate(5, 0.2999)
    assert not stay.advanced and h.length(6) == 8 and "stays 8" in stay.line()
    up = h.gate(10, 0.3)  # "at least H_min" advances
    assert up.advanced and (up.before, up.after) == (8, 16) and h.length(11) == 16
    assert h.gate(15, 0.25).after == 16
    assert h.gate(20, 0.9).after == 32  # an entropy that recovers lets it grow again
    assert h.gate(25, 0.9) is None  # at the last length there is nothing to decide
    assert [d["step"] for d in h.record(30)["decisions"]] == [5, 10, 15, 20] and h.record(30)["final"] == 32
    assert up.logged() == {"gate/entropy": 0.3, "gate/advanced": 1.0, "gate/max_new_tokens": 16}


def test_the_gate_state_survives_a_checkpoint():
    h = gated(8, 16, 32)
    h.gate(5, 1.0)
    h.gate(10, 0.0)
    again = gated(8, 16, 32)
    again.load_state_dict(json.loads(json.dumps(h.state_dict())))  # what a checkpoint keeps is plain data
    assert again == h and again.length(11) == 16
    fresh = gated(8, 16, 32)
    fresh.load_state_dict(None)  # a checkpoint from before length schedules
    assert fresh.index == 0 and fresh.decisions == []


def schedule_config(**sampling) -> Config:
    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor = "student", "student"
    cfg.eval.every, cfg.trainer.max_steps = 5, 20
    for key, value in sampling.items():
        setattr(cfg.sampling, key, value)
    return cfg


GATED = dict(length_schedule="entropy_gated", lengths=[8, 16], entropy_min=0.3)


@pytest.mark.parametrize("change, message", [
    (dict(length_schedule="entropy_gated", lengths=[16, 8], entropy_min=0.3), r"must grow \(L_1 < L_2"),
    (dict(length_schedule="entropy_gated", lengths=[8, 16]), "needs sampling.entropy_min"),
    (dict(length_schedule="entropy_gated", entropy_min=0.3), "needs sampling.lengths"),
    (dict(length_schedule="steps", lengths=[8, 16]), "needs sampling.length_steps"),
    (dict(length_schedule="steps", lengths=[8, 16, 32], length_steps=[5]), "one step per length after the first"),
    (dict(length_schedule="steps", lengths=[8, 16, 32], length_steps=[9, 5]), "increasing steps >= 2"),
    (dict(length_schedule="steps", lengths=[8, 16], length_steps=[25]), "past trainer.max_steps=20"),
    (dict(lengths=[8, 16]), "belongs to sampling.length_schedule=steps or entropy_gated"),
    (dict(length_schedule="steps", lengths=[8, 16], length_steps=[5], entropy_min=0.1), "entropy_min belongs to"),
    (dict(length_schedule="entropy_gated", lengths=[8], entropy_min=0.3), "at least two horizons"),
    (dict(length_schedule="gated"), "sampling.length_schedule"),
])
def test_a_schedule_that_cannot_run_is_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        schedule_config(**change).check()


def test_the_gate_needs_evaluations_during_training_and_sampled_states():
    cfg = schedule_config(**GATED)
    cfg.eval.every = 0
    with pytest.raises(ConfigError, match="decides at each evaluation during training; set eval.every"):
        cfg.check()
    cfg = schedule_config(**GATED)
    cfg.prefix.source, cfg.trajectory.supervisor = "fixed", "expert"
    with pytest.raises(ConfigError, match="prefix=fixed samples none"):
        cfg.check()


def test_the_label_sets_a_scheduled_horizon_apart():
    cfg = schedule_config(**GATED)
    cfg.check()
    assert cfg.method == "OPD len(8→16 gated at H≥0.3)"
    cfg = schedule_config(length_schedule="steps", lengths=[8, 16], length_steps=[5])
    assert cfg.method == "OPD len(8@1,16@5)"
    assert schedule_config().method == "OPD"  # runs from before schedules keep their label


def run_rows(tmp_path, name: str, **sampling) -> tuple[list[dict], dict]:
    from kltd.train.job import train_job
    from tests.train.test_job import tiny_config

    cfg = tiny_config(max_steps=6, log_every=1)
    cfg.eval.every = 2
    if sampling.pop("prefix", None) == "teacher":
        cfg.prefix.source, cfg.trajectory.supervisor = "teacher", "expert"
    for key, value in sampling.items():
        setattr(cfg.sampling, key, value)
    train_job(cfg, tmp_path / name)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((tmp_path / name / "metrics.json").read_text())


def test_a_gated_run_grows_at_each_evaluation_when_h_min_is_zero_and_never_when_it_is_out_of_reach(tmp_path):
    """Entropy is >= 0, so H_min = 0 always advances; a per-token entropy is at most log V, far below H_min = 20
    nats, so that gate never opens. Each step's sampled student tokens stay within its horizon (the batch's rows x horizon)."""
    grows, summary = run_rows(tmp_path, "grows", length_schedule="entropy_gated", lengths=[2, 3, 4], entropy_min=0.0)
    horizons = {r["step"]: r["train/max_new_tokens"] for r in grows if "train/max_new_tokens" in r}
    assert horizons == {1: 2, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4}
    gates = [r for r in grows if "gate/entropy" in r]
    assert [(r["step"], r["gate/advanced"], r["gate/max_new_tokens"]) for r in gates] == [(2, 1.0, 3), (4, 1.0, 4)]
    assert summary["horizon"]["final"] == 4 and len(summary["horizon"]["decisions"]) == 2
    generated = [r["cost/student_tokens_generated"] for r in grows if "train/loss" in r]
    per_step = [b - a for a, b in zip([0] + generated, generated)]
    assert all(0 < n <= 4 * horizons[step] for step, n in zip(range(1, 7), per_step))  # 4 rows a step

    stuck, summary = run_rows(tmp_path, "stuck", length_schedule="entropy_gated", lengths=[2, 3, 4], entropy_min=20.0)
    assert {r["train/max_new_tokens"] for r in stuck if "train/max_new_tokens" in r} == {2}
    assert [r["gate/advanced"] for r in stuck if "gate/entropy" in r] == [0.0, 0.0]
    assert all(r["gate/entropy"] < 20.0 for r in stuck if "gate/entropy" in r)
    assert summary["horizon"]["final"] == 2


def test_a_step_schedule_sets_the_teachers_horizon_too(tmp_path):
    """prefix=teacher: the teacher writes the states, each step within its horizon."""
    rows, summary = run_rows(tmp_path, "teacher", length_schedule="steps", lengths=[3, 6], length_steps=[4],
                             prefix="teacher")
    trained = [r for r in rows if "train/loss" in r]
    assert [r["train/max_new_tokens"] for r in trained] == [3, 3, 3, 6, 6, 6]
    generated = [0] + [r["cost/teacher_tokens_generated"] for r in trained]
    per_step = [b - a for a, b in zip(generated, generated[1:])]
    assert all(n <= 4 * r["train/max_new_tokens"] for n, r in zip(per_step, trained)) and max(per_step[3:]) > 4 * 3
    assert summary["horizon"]["schedule"] == "steps" and summary["horizon"]["final"] == 6


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_a_gated_horizon_on_real_architectures(tmp_path, arch):
    from kltd.train.job import train_job
    from tests.support.fixtures import on_local_gsm8k_pair
    from tests.train.test_job import tiny_config

    cfg = on_local_gsm8k_pair(tiny_config(max_steps=4, log_every=1), tmp_path, arch)
    cfg.eval.every = 2
    cfg.sampling.length_schedule, cfg.sampling.lengths, cfg.sampling.entropy_min = "entropy_gated", [4, 8], 0.0
    summary = train_job(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/max_new_tokens"] for r in rows if "train/loss" in r] == [4, 4, 8, 8]
    assert summary["horizon"]["decisions"][0]["after"] == 8 and "accuracy" in summary["eval_after"]
