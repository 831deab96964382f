"""The RL stage's config (`rl=grpo`, conf/rl/grpo.yaml): GRPO on the student after its distillation, in the same run.

kltd.train.reinforce runs it; kltd.objectives.grpo holds its objective. `rl.algorithm=none` (the default): no RL stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kltd.schema import choices as C
from kltd.schema.checks import ConfigError, at_least, choice, in_unit_interval, positive


@dataclass
class RLConfig:
    algorithm: str = "none"  # none | grpo
    steps: int = 100  # optimiser steps of the RL stage, after trainer.max_steps of distillation
    group_size: int = 8  # samples of each prompt; the advantages compare a sample with its group
    batch_size: int = 32  # samples per micro-batch (batch_size / group_size prompts)
    grad_accum: int = 1
    # updates per sampled batch: 1 is purely on-policy (the clip never acts); more reuse the batch, PPO-style,
    # with the ratio to the sampling policy clipped to [1 - clip_low, 1 + clip_high]
    epochs: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.2
    lr: float = 3e-5  # constant after trainer.warmup_steps of linear warm-up (3e-4 unlearned the toy task)
    baseline: str = "group_mean"  # group_mean (GRPO) | leave_one_out (RLOO, unbiased)
    scale: str = "std"  # std (GRPO: advantages divided by the group's std) | none (Dr. GRPO)
    normalization: str = "token"  # token | sequence, as loss.normalization
    # the k3 penalty to the starting policy (the distilled student): weight beta, 0 = none
    kl_weight: float = 0.0
    # the teacher's reverse KL at the student's samples, added with this weight (distillation and reward
    # together, as KDRL does); 0 = reward only
    teacher_weight: float = 0.0
    # what scores a response: "checker" (the data's answer checker: 1 correct, 0 not), or "module:function", a
    # function (texts: list[str], examples: list) -> list[float] importable from the working directory
    reward: str = "checker"
    max_new_tokens: Optional[int] = None  # null: the distillation's last training horizon
    temperature: Optional[float] = None  # null: sampling.temperature

    @property
    def enabled(self) -> bool:
        return self.algorithm != "none"

    def check(self) -> None:
        choice("rl.algorithm", self.algorithm, C.RL_ALGORITHMS)
        if not self.enabled:
            return
        for key in ("steps", "group_size", "batch_size", "grad_accum", "epochs"):
            at_least(f"rl.{key}", getattr(self, key), 1)
        if self.group_size < 2:
            raise ConfigError(f"rl.group_size={self.group_size}: GRPO compares a sample with the other samples of "
                              "its prompt; use rl.group_size >= 2")
        if self.batch_size % self.group_size:
            raise ConfigError(f"rl.batch_size={self.batch_size} is not a whole number of groups of rl.group_size="
                              f"{self.group_size} (rl.batch_size counts samples); use a multiple of {self.group_size}")
        choice("rl.baseline", self.baseline, C.RL_BASELINES)
        choice("rl.scale", self.scale, C.RL_SCALES)
        choice("rl.normalization", self.normalization, C.NORMALIZATIONS)
        for key in ("clip_low", "clip_high"):
            in_unit_interval(f"rl.{key}", getattr(self, key))
        positive("rl.lr", self.lr)
        at_least("rl.kl_weight", self.kl_weight, 0.0)
        at_least("rl.teacher_weight", self.teacher_weight, 0.0)
        if self.max_new_tokens is not None:
            at_least("rl.max_new_tokens", self.max_new_tokens, 1)
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"rl.temperature={self.temperature}: GRPO needs sampled responses (a temperature > 0)")
        if self.reward != "checker" and self.reward.count(":") != 1:
            raise ConfigError(f"rl.reward={self.reward!r}: use checker (the data's answer checker) or "
                              "module:function, e.g. rl.reward=my_rewards:length_penalised")
