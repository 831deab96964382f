"""KL mixing on a schedule (loss.mix_schedule): its weight at the ends and the middle, its checks, its label, and
a run that follows it step by step."""

import json

import pytest

from kltd.schema.axes import LossConfig
from kltd.schema.config import Config, ConfigError


def scheduled(kind: str, start: float, end: float) -> LossConfig:
    return LossConfig(divergence="kl_mix", mix=start, mix_schedule=kind, mix_end=end)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_weight_runs_from_mix_at_the_first_step_to_mix_end_at_the_last(kind):
    loss = scheduled(kind, 0.1, 0.9)
    weights = [loss.mix_at(step, 9) for step in range(1, 10)]
    assert weights[0] == 0.1 and weights[-1] == pytest.approx(0.9, abs=1e-15)
    assert weights[4] == pytest.approx(0.5, abs=1e-15)  # both are symmetric about the middle step
    assert all(a < b for a, b in zip(weights, weights[1:]))
    assert loss.mean_mix == pytest.approx(0.5)


def test_linear_and_cosine_by_hand():
    assert scheduled("linear", 0.0, 1.0).mix_at(3, 5) == 0.5 and scheduled("linear", 0.0, 1.0).mix_at(2, 5) == 0.25
    assert scheduled("cosine", 0.0, 1.0).mix_at(2, 5) == pytest.approx((1 - 2 ** -0.5) / 2)  # (1 - cos(pi/4)) / 2
    assert LossConfig(divergence="kl_mix", mix=0.3).mix_at(7, 10) == 0.3  # constant


@pytest.mark.parametrize("loss, message", [
    (LossConfig(divergence="jsd", mix_schedule="linear", mix_end=0.9), "needs loss.divergence=kl_mix"),
    (LossConfig(divergence="kl_mix", mix_schedule="cosine"), "needs loss.mix_end"),
    (LossConfig(divergence="kl_mix", mix_end=0.9), "set loss.mix_schedule=linear or cosine"),
    (LossConfig(divergence="kl_mix", mix_schedule="linear", mix_end=1.5), "loss.mix_end"),
    (LossConfig(divergence="kl_mix", mix_schedule="step", mix_end=0.5), "loss.mix_schedule"),
])
def test_a_schedule_that_cannot_run_is_refused(loss, message):
    with pytest.raises(ConfigError, match=message):
        loss.check()


def test_the_label_shows_the_course_and_the_mean_files_the_blend():
    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor = "student", "expert"
    cfg.loss = scheduled("cosine", 0.1, 0.9)
    cfg.check()
    assert cfg.method == "DAgger [kl_mix(0.1→0.9 cosine)]"
    cfg.loss = scheduled("linear", 0.6, 1.0)  # mean 0.8: reverse-heavy, filed under the student trajectory
    with pytest.raises(ConfigError, match="trajectory=student"):
        cfg.check()
    cfg.trajectory.supervisor = "student"
    cfg.check()
    assert cfg.method == "OPD [kl_mix(0.6→1 linear)]"


def test_a_run_follows_the_schedule_and_its_first_step_is_the_constant_mix_of_its_start(tmp_path):
    from kltd.train.job import train_job
    from tests.train.test_job import tiny_config

    def run(name: str, loss: LossConfig) -> list[dict]:
        cfg = tiny_config(max_steps=5, log_every=1)
        cfg.trajectory.supervisor = "expert"
        cfg.loss = loss
        train_job(cfg, tmp_path / name)
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                if "train/loss" in line]

    rows = run("scheduled", scheduled("linear", 0.0, 1.0))
    assert [row["train/mix"] for row in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    constant = run("constant", LossConfig(divergence="kl_mix", mix=0.0))
    # the same weights, data and samples at step 1: the same arithmetic, so the same loss to the bit
    assert rows[0]["train/loss"] == constant[0]["train/loss"]
    assert rows[1]["train/loss"] != constant[1]["train/loss"]
