"""The RL stage after distillation (rl=grpo): GRPO on the distilled student, in the same run.

    kltd train prefix=student trajectory=expert rl=grpo rl.steps=20     # DAgger, then GRPO on its student

Each RL step samples rl.group_size responses of each of rl.batch_size / rl.group_size prompts from the current
student (at rl.temperature, up to rl.max_new_tokens tokens), scores them with the reward (the data's answer
checker, or rl.reward=module:function), turns the rewards into advantages within each group
(kltd.objectives.grpo.group_advantages) and takes rl.epochs optimiser steps on PPO's clipped surrogate
(kltd.objectives.grpo.policy_loss; one epoch is purely on-policy), plus rl.kl_weight x the k3 penalty to the
starting policy and rl.teacher_weight x the teacher's exact reverse KL at the student's samples. The models,
scorers, samplers (kltd's decoder or the vLLM engine, as the execution plan routes the student), data order,
processes and FLOP counter are the distillation trainer's; the optimiser is its own (AdamW at rl.lr).

Every draw is keyed by (seed, step, the row's place in the step's global batch) as in distillation
(kltd.rollout.noise), a group never spans processes, and the stage's whole state is in its checkpoints: a run
resumed in the RL stage, on any number of processes, takes the steps the uninterrupted one takes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from kltd.objectives.divergences import DivergenceSpec
from kltd.objectives.grpo import group_advantages, policy_loss, reference_kl_penalty
from kltd.objectives.rewards import checker_rewards
from kltd.objectives.losses import token_logprobs, trajectory_loss
from kltd.rollout.batch import StateBatch, TokenCounts, decode_responses
from kltd.rollout.states import StateSource
from kltd.schema.axes import PrefixConfig
from kltd.schema.config import Config, ConfigError
from kltd.train.compute import FlopCounter, sampling_flops, sequence_flops, training_flops
from kltd.train.optim import adamw
from kltd.train.sharding import gathered_optimizer_state, scattered_optimizer_state, whole
from kltd.train.trainer import StepStats, Trainer, TrainingError

Reward = Callable[[list[str], list], list[float]]
STUDENT_STATES = PrefixConfig(source="student")
# what the stage's steps average over processes (the others, the loss parts, are sums over the global denominator)
AVERAGED = ("clip_fraction", "ratio_mean")


def reward_function(reference: str, checker) -> Reward:
    """rl.reward: "checker" (the data's answer checker: 1 for a correct response, 0 otherwise), or "module:function"
    importable from the working directory. Settled before any model loads: a name that does not import is one line."""
    if reference == "checker":
        return functools.partial(checker_rewards, checker)
    import importlib
    import sys

    module_name, name = reference.split(":")
    if "" not in sys.path and "." not in sys.path:  # the console script's path lacks the working directory
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"rl.reward={reference}: module {module_name!r} does not import ({error}); it must be "
                          "importable from the working directory or the environment") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"rl.reward={reference}: {module_name} has no function {name!r}")
    return function


@dataclass
class _Constants:
    """What a sampled batch's loss holds fixed across its epochs."""

    rewards: torch.Tensor
    advantages: torch.Tensor
    old: torch.Tensor | None  # the sampling policy's log-probabilities (rl.epochs > 1)
    reference: torch.Tensor | None  # the starting policy's (rl.kl_weight > 0)
    teacher: torch.Tensor | None  # the teacher's logits (rl.teacher_weight > 0)


class Reinforcer:
    """GRPO on `trainer`'s student. `reward(texts, examples) -> rewards`; `reference`: a frozen copy of the starting
    student (needed when rl.kl_weight > 0)."""

    def __init__(self, cfg: Config, trainer: Trainer, reward: Reward, reference: torch.nn.Module | None = None):
        self.cfg, self.rl, self.trainer = cfg, cfg.rl, trainer
        self.student, self.device, self.ranks = trainer.student, trainer.device, trainer.ranks
        self.reward, self.reference = reward, reference
        rl, s = cfg.rl, cfg.sampling
        self.temperature = rl.temperature if rl.temperature is not None else s.temperature
        self.max_new_tokens = rl.max_new_tokens or trainer.horizon.length(cfg.trainer.max_steps)
        sampler = replace(trainer.states.student, max_new_tokens=self.max_new_tokens, temperature=self.temperature)
        self.states = StateSource(STUDENT_STATES, student=sampler, teacher=trainer.states.teacher,
                                  tokenizer=trainer.tokenizer)
        self.optimizer = adamw(self.student.parameters(), lr=rl.lr, weight_decay=cfg.trainer.weight_decay)
        warmup = cfg.trainer.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        self.steps_done = 0

    @property
    def flops(self) -> FlopCounter:
        return self.trainer.flops  # one count for the whole run

    @property
    def adapter(self):
        """A LoRA student's peft wrapper (None otherwise): its checkpoints save and restore the adapter."""
        return self.trainer.adapter

    def state_dict(self) -> dict:
        """Everything besides the student's weights that the next RL step depends on (kltd.train.checkpoint): its
        optimiser, schedule and step, and the run's shared state (Trainer.run_state)."""
        return {"stage": "rl", "optimizer": gathered_optimizer_state(self.optimizer),
                "scheduler": self.scheduler.state_dict(), "steps_done": self.steps_done, **self.trainer.run_state()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(scattered_optimizer_state(state["optimizer"], self.optimizer))
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = state["steps_done"]
        self.states.student.push_weights(self.student, step=self.global_step)
        self.trainer.load_run_state(state)

    @property
    def global_step(self) -> int:
        """The run's step: the distillation's, then the RL stage's after it."""
        return self.cfg.trainer.max_steps + self.steps_done

    def next_states(self, micro: int) -> tuple[StateBatch, TokenCounts]:
        """This process's whole groups of micro-batch `micro`: each prompt's rl.group_size samples side by side."""
        return self.trainer.grouped_states(self.states, self.rl.batch_size, self.rl.group_size, micro, self.global_step)

    def constants(self, batch: StateBatch) -> _Constants:
        """Rewards and advantages of a sampled batch, and the log-probabilities the loss holds fixed."""
        rl, scorer = self.rl, self.trainer.scorers["student"]
        texts = decode_responses(self.trainer.tokenizer, batch.responses)
        rewards = torch.tensor(self.reward(texts, batch.examples), dtype=torch.float32, device=self.device)
        if rewards.shape != (len(texts),) or not bool(torch.isfinite(rewards).all()):
            raise TrainingError(f"rl.reward={rl.reward} returned {rewards.tolist()[:8]}... for {len(texts)} responses; "
                                "it must give one finite number per response")
        targets, mask = batch.responses.tokens, batch.supervised

        def logprobs(model) -> torch.Tensor:
            return token_logprobs(scorer.logits(model, batch), targets, mask, self.temperature,
                                  top_p=self.cfg.sampling.top_p)

        with torch.inference_mode():
            old = logprobs(self.student) if rl.epochs > 1 else None
            reference = logprobs(self.reference) if rl.kl_weight > 0 else None
            teacher = None
            if rl.teacher_weight > 0:
                teacher = self.trainer.scorers["teacher"].logits(self.trainer.teacher, batch)
                self.trainer.teacher_forwards += 1
        # cloned outside inference mode: normal tensors again, usable beside autograd's
        return _Constants(rewards, group_advantages(rewards, rl.group_size, rl.baseline, rl.scale),
                          *(None if x is None else x.clone() for x in (old, reference, teacher)))

    def loss(self, batch: StateBatch, fixed: _Constants, denominator: float) -> tuple[torch.Tensor, dict]:
        """The clipped surrogate, plus the KL penalty to the starting policy and the teacher's reverse KL."""
        rl = self.rl
        logits = self.trainer.scorers["student"].logits(self.student, batch)
        targets, mask = batch.responses.tokens, batch.supervised
        logprobs = token_logprobs(logits, targets, mask, self.temperature, top_p=self.cfg.sampling.top_p)
        common = dict(normalization=rl.normalization, denominator=denominator)
        old = fixed.old if fixed.old is not None else logprobs.detach()
        total, parts = policy_loss(logprobs, old, fixed.advantages, mask, clip_low=rl.clip_low, clip_high=rl.clip_high,
                                   **common)
        parts["loss_policy"] = float(total.detach())
        if rl.kl_weight > 0:
            kl = reference_kl_penalty(logprobs, fixed.reference, mask, **common)
            total = total + rl.kl_weight * kl
            parts["kl_reference"] = float(kl.detach())
        if rl.teacher_weight > 0:
            rkl = trajectory_loss(logits, fixed.teacher, targets, mask, trajectory="student",
                                  spec=DivergenceSpec("reverse_kl"), **common)
            total = total + rl.teacher_weight * rkl
            parts["teacher_reverse_kl"] = float(rkl.detach())
        return total, parts

    def step(self) -> StepStats:
        """One RL step: sample and score rl.grad_accum micro-batches of groups, then rl.epochs optimiser updates."""
        rl, t = self.rl, self.cfg.trainer
        stats = StepStats()
        self.student.eval()  # sampling: no dropout
        sampled, shapes = [], self.trainer.shapes
        for micro in range(rl.grad_accum):
            batch, counts = self.next_states(micro)
            stats.tokens.add(counts)
            stats.flops.student_sampling += sampling_flops(batch, STUDENT_STATES, shapes["student"], shapes["teacher"])[0]
            sampled.append((batch, self.constants(batch)))
        self.student.train()
        lengths = [batch.attention_mask.sum(1).tolist() for batch, _ in sampled]
        for rows in lengths:  # the constants' forwards: the old policy's and the reference's, the teacher's
            stats.flops.student_train += ((rl.epochs > 1) + (rl.kl_weight > 0)) * sequence_flops(shapes["student"], rows)
            stats.flops.teacher_score += (rl.teacher_weight > 0) * sequence_flops(shapes["teacher"], rows)
        local = [sum(int(b.supervised.sum()) for b, _ in sampled), sum(b.num_sequences for b, _ in sampled),
                 sum(float(f.rewards.sum()) for _, f in sampled), sum(len(f.rewards) for _, f in sampled)]
        tokens, sequences, reward_sum, responses = self.ranks.sum(local)
        denominator = float(tokens if rl.normalization == "token" else sequences)
        grad_norm = None
        for epoch in range(rl.epochs):
            self.optimizer.zero_grad(set_to_none=True)
            bad, parts = None, {}
            for (batch, fixed), rows in zip(sampled, lengths):
                loss, these = self.loss(batch, fixed, denominator)
                stats.flops.student_train += training_flops(shapes["student"], rows)
                if not torch.isfinite(loss):
                    bad = f"the RL loss became {float(loss.detach())}"
                    break
                loss.backward()
                for k, v in {"loss": float(loss.detach()), **these}.items():
                    parts[k] = parts.get(k, 0.0) + v
            self.ranks.sum_gradients(self.student.parameters())
            if self.ranks.any(bad is not None) and bad is None:
                bad = "the RL loss became non-finite in another process"
            if bad is None:
                grad_norm = whole(torch.nn.utils.clip_grad_norm_(self.student.parameters(), t.max_grad_norm))
                if not torch.isfinite(grad_norm):
                    bad = f"the RL gradient norm became {float(grad_norm)}"
            if bad is not None:  # as in distillation: skipped while trainer.skip_bad_steps allows
                self.trainer.bad_step(bad, self.global_step + 1)
                self.optimizer.zero_grad(set_to_none=True)
                break
            self.optimizer.step()
            if epoch == 0:  # the first update's loss: the on-policy surrogate at the sampling weights
                stats.parts = parts
            # how far the reused batch's policy has moved: the last update's ratios
            stats.parts.update({k: parts[k] for k in AVERAGED})
        self.scheduler.step()
        self.steps_done += 1
        self.states.student.push_weights(self.student, step=self.global_step)
        stats.parts = self._gathered(stats.parts, len(sampled))
        stats.loss = stats.parts.pop("loss", float("nan"))
        stats.parts.update(reward=reward_sum / responses, lr=self.scheduler.get_last_lr()[0],
                           response_length=tokens / sequences)
        if grad_norm is not None:
            stats.parts["grad_norm"] = float(grad_norm)
        stats.trained_tokens = int(tokens)
        stats.real_tokens = sum(sum(rows) for rows in lengths)
        stats.tokens.scored += stats.trained_tokens * (1 + (rl.epochs > 1) + (rl.kl_weight > 0)
                                                       + (rl.teacher_weight > 0))
        self.trainer.flops.add(self._gathered_flops(stats.flops))
        return stats

    def _gathered(self, parts: dict, micro_batches: int) -> dict:
        """The step's figures over every process: sums for the losses, means for the per-token ratios."""
        for k in AVERAGED:
            if k in parts:
                parts[k] /= micro_batches
        if self.ranks.world == 1 or not parts:
            return parts
        keys = sorted(parts)
        total = self.ranks.sum([parts[k] for k in keys])
        return {k: v / self.ranks.world if k in AVERAGED else v for k, v in zip(keys, total)}

    def _gathered_flops(self, flops: FlopCounter) -> FlopCounter:
        return flops if self.ranks.world == 1 else FlopCounter.from_sums(self.ranks.sum(flops.values()))
