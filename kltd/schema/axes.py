"""The two axes of a method and its loss: which states the student trains on (prefix), whose next-token
choice supervises it there (trajectory), and how the two terms are weighed (loss). Each section checks its
own values; the rules between them and the rest live in kltd.schema.config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from kltd.schema import choices as C
from kltd.schema.checks import ConfigError, at_least, choice, in_unit_interval, positive
from kltd.schema.divergences import DEFAULTS


@dataclass
class PrefixConfig:
    """Where the training states come from."""

    source: str = "fixed"  # fixed | teacher | student | mixed
    # mixed: per sequence, student states with this probability (GKD's lambda), else `other` states.
    student_fraction: float = 0.5
    other: str = "fixed"  # mixed: fixed | teacher
    # mixed: "linear" ramps the student fraction from student_fraction_start to student_fraction
    # over schedule_steps optimiser steps; "constant" keeps student_fraction.
    schedule: str = "constant"
    student_fraction_start: float = 0.0
    schedule_steps: int = 100
    # mixed: on the student's rows, the student writes the first k response tokens and the teacher
    # continues (roll-in / roll-out). k is "fixed" (handoff_k_value), "uniform" over the reference
    # response's length, or "geometric" (success probability handoff_p, starting at 0).
    handoff: bool = False
    handoff_k: str = "uniform"
    handoff_k_value: int = 4
    handoff_p: float = 0.2
    supervise: str = "all"  # all | after_handoff: which positions of a hand-off row are supervised

    def sampling_models(self) -> tuple[str, ...]:
        """The models ("student", "teacher") that write training states by sampling."""
        if self.source != "mixed":
            return (self.source,) if self.source in ("student", "teacher") else ()
        ramps = self.schedule != "constant"
        student = self.student_fraction > 0 or ramps
        teacher = (self.other == "teacher" and (self.student_fraction < 1 or ramps)) or (student and self.handoff)
        return ("student",) * student + ("teacher",) * teacher

    def check(self) -> None:
        choice("prefix", self.source, C.PREFIXES)
        choice("prefix.other", self.other, C.MIXED_OTHER)
        in_unit_interval("prefix.student_fraction", self.student_fraction)
        in_unit_interval("prefix.student_fraction_start", self.student_fraction_start)
        choice("prefix.schedule", self.schedule, C.SCHEDULES)
        at_least("prefix.schedule_steps", self.schedule_steps, 1)
        choice("prefix.handoff_k", self.handoff_k, C.HANDOFF_K)
        at_least("prefix.handoff_k_value", self.handoff_k_value, 0)
        if not 0.0 < self.handoff_p <= 1.0:
            raise ConfigError(f"prefix.handoff_p={self.handoff_p} must lie in (0, 1]")
        choice("prefix.supervise", self.supervise, C.SUPERVISE)
        if self.source != "mixed" and (self.handoff or self.schedule != "constant"):
            raise ConfigError("prefix.handoff and prefix.schedule apply to prefix=mixed only; add prefix=mixed")
        if self.supervise != "all" and not self.handoff:
            raise ConfigError("prefix.supervise=after_handoff needs a hand-off: add prefix.handoff=true")


@dataclass
class TrajectoryConfig:
    """Whose next-token choice supervises the student at those states."""

    supervisor: str = "expert"  # expert (forward KL) | student (reverse KL) | dataset (cross-entropy)
    # dataset only (offline RL): a return per sequence and how it weights the cross-entropy
    reward: str = "none"  # none | correctness (verifier) | teacher_loglik
    weighting: str = "none"  # none | filter (keep the top keep_fraction) | awr
    keep_fraction: float = 0.5
    awr_temperature: float = 1.0
    awr_max_weight: float = 20.0

    def check(self) -> None:
        choice("trajectory", self.supervisor, C.TRAJECTORIES)
        choice("trajectory.reward", self.reward, C.REWARDS)
        choice("trajectory.weighting", self.weighting, C.WEIGHTINGS)
        if self.supervisor != "dataset" and (self.reward != "none" or self.weighting != "none"):
            raise ConfigError("trajectory.reward and trajectory.weighting apply to trajectory=dataset only")
        if (self.weighting == "none") != (self.reward == "none"):
            raise ConfigError("set trajectory.reward and trajectory.weighting together (a reward needs a weighting)")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ConfigError(f"trajectory.keep_fraction={self.keep_fraction} must lie in (0, 1]")
        positive("trajectory.awr_temperature", self.awr_temperature)
        positive("trajectory.awr_max_weight", self.awr_max_weight)


@dataclass
class LossConfig:
    """total = kl_trajectory_weight * L_traj + kl_prefix_weight * L_prefix."""

    kl_trajectory_weight: float = 1.0
    kl_prefix_weight: float = 0.0
    # None: the trajectory's own divergence (expert -> forward_kl, student -> reverse_kl). A blend (jsd,
    # kl_mix, tv, the skews) may replace it; the other KL direction may not (that is the other trajectory).
    divergence: Optional[str] = None
    beta: float = DEFAULTS["beta"]  # jsd, jsd_scaled (kltd.schema.divergences has each divergence's parameter)
    alpha: float = DEFAULTS["alpha"]  # skew KLs
    mix: float = DEFAULTS["mix"]  # kl_mix: weight of reverse KL (at the first step, with a schedule)
    # kl_mix over training: constant (mix throughout) | linear | cosine, from mix at the first optimiser step to
    # mix_end at the last (the paper's KL mixing with a schedule)
    mix_schedule: str = "constant"
    mix_end: Optional[float] = None
    temperature: float = 1.0
    estimator: str = "exact"  # exact | topk | sampled_k1 | sampled_k2 | sampled_k3 | sampled_reward
    top_k: int = 8
    normalization: str = "token"  # token | sequence
    gamma: float = 1.0  # prefix term discount
    baseline: str = "batch_mean"  # prefix term baseline: none | batch_mean | leave_one_out

    def check(self) -> None:
        if self.divergence is not None:
            choice("loss.divergence", self.divergence, C.DIVERGENCES)
        choice("loss.estimator", self.estimator, C.ESTIMATORS)
        choice("loss.normalization", self.normalization, C.NORMALIZATIONS)
        choice("loss.baseline", self.baseline, C.BASELINES)
        for key in ("beta", "alpha", "mix", "gamma"):
            in_unit_interval(f"loss.{key}", getattr(self, key))
        at_least("loss.kl_trajectory_weight", self.kl_trajectory_weight, 0.0)
        at_least("loss.kl_prefix_weight", self.kl_prefix_weight, 0.0)
        at_least("loss.top_k", self.top_k, 1)
        positive("loss.temperature", self.temperature)
        choice("loss.mix_schedule", self.mix_schedule, C.MIX_SCHEDULES)
        if self.mix_schedule == "constant" and self.mix_end is not None:
            raise ConfigError("loss.mix_end is where a schedule of loss.mix ends; set loss.mix_schedule=linear or "
                              "cosine, or drop loss.mix_end")
        if self.mix_schedule != "constant":
            if self.divergence != "kl_mix":
                raise ConfigError(f"loss.mix_schedule={self.mix_schedule} schedules kl_mix's weight; it needs "
                                  "loss.divergence=kl_mix (or divergence=kl_mix)")
            if self.mix_end is None:
                raise ConfigError(f"loss.mix_schedule={self.mix_schedule} needs loss.mix_end, the weight of reverse "
                                  "KL at the last step (loss.mix is the first step's)")
            in_unit_interval("loss.mix_end", self.mix_end)
        if self.kl_trajectory_weight == 0 and self.kl_prefix_weight == 0:
            raise ConfigError("loss.kl_trajectory_weight and loss.kl_prefix_weight are both 0: nothing would be trained")

    @property
    def parameters(self) -> dict:
        """The divergence parameters a blend is filed and named by; a scheduled mix by its mean over training."""
        return {"beta": self.beta, "alpha": self.alpha, "mix": self.mean_mix}

    @property
    def mean_mix(self) -> float:
        # both schedules are symmetric about the middle of training: their mean is the endpoints' mean
        return self.mix if self.mix_schedule == "constant" else (self.mix + self.mix_end) / 2

    def mix_at(self, step: int, total: int) -> float:
        """kl_mix's weight of reverse KL at optimiser step `step` of `total` (1-based): mix at the first step,
        mix_end at the last, linear or half a cosine between."""
        if self.mix_schedule == "constant":
            return self.mix
        progress = min(1.0, max(0.0, (step - 1) / max(1, total - 1)))
        if self.mix_schedule == "cosine":
            progress = (1.0 - math.cos(math.pi * progress)) / 2
        return self.mix + progress * (self.mix_end - self.mix)

    def mix_text(self) -> str | None:
        """'0.1→0.9 cosine' for a scheduled mix, None for a constant one."""
        if self.mix_schedule == "constant":
            return None
        return f"{self.mix:g}→{self.mix_end:g} {self.mix_schedule}"
