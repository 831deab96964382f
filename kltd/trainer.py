"""One trainer for every cell of the method matrix.

    kltd train                                          # 1 device (CUDA if present, else CPU)
    kltd train prefix=student trajectory=expert         # DAgger
    kltd train -m prefix=fixed,student trajectory=expert,student

Each step: draw states from the prefix source, score them with the student (grad) and the teacher
(inference_mode), form kl_trajectory_weight * L_traj + kl_prefix_weight * L_prefix, step AdamW.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch

from kltd.config import Config
from kltd.divergences import DivergenceSpec
from kltd.losses import prefix_loss, trajectory_loss
from kltd.states import Sampler, StateBatch, StateSource, TokenCounts, response_logits


class TrainingError(RuntimeError):
    """The run cannot go on (for example a NaN loss); reported as one line."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(warmup: int, total: int, floor: float):
    """Linear warm-up, then cosine decay to `floor` x lr."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def divergence_spec(cfg: Config) -> DivergenceSpec | None:
    loss = cfg.loss
    if cfg.trajectory.supervisor == "dataset":
        return None
    default = "forward_kl" if cfg.trajectory.supervisor == "expert" else "reverse_kl"
    return DivergenceSpec(
        name=loss.divergence or default, beta=loss.beta, alpha=loss.alpha, mix=loss.mix, temperature=loss.temperature
    )


@dataclass
class StepStats:
    loss: float = 0.0
    parts: dict = field(default_factory=dict)
    tokens: TokenCounts = field(default_factory=TokenCounts)
    trained_tokens: int = 0


class Trainer:
    def __init__(self, cfg: Config, pair, train_examples: list):
        self.cfg = cfg
        self.student, self.teacher, self.tokenizer = pair.student, pair.teacher, pair.tokenizer
        self.device = pair.device
        self.examples = train_examples
        self.spec = divergence_spec(cfg)
        t = cfg.trainer
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        s = cfg.sampling
        self.states = StateSource(
            cfg.prefix.source,
            student=Sampler(self.student, self.tokenizer, s.max_new_tokens, s.temperature, s.top_p),
            teacher=Sampler(self.teacher, self.tokenizer, s.max_new_tokens, s.temperature, s.top_p),
            tokenizer=self.tokenizer,
            student_fraction=cfg.prefix.student_fraction,
            other=cfg.prefix.other,
            seed=cfg.seed,
        )
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.order = random.Random(cfg.seed)
        self.cursor = len(train_examples)
        self.permutation: list[int] = []

    def next_examples(self, n: int) -> list:
        """Epochs over the training split in a seeded shuffled order."""
        out = []
        while len(out) < n:
            if self.cursor >= len(self.permutation):
                self.permutation = list(range(len(self.examples)))
                self.order.shuffle(self.permutation)
                self.cursor = 0
            take = self.permutation[self.cursor : self.cursor + n - len(out)]
            self.cursor += len(take)
            out += [self.examples[i] for i in take]
        return out

    def needs_teacher_logits(self, batch: StateBatch) -> bool:
        if self.cfg.trajectory.supervisor != "dataset" and self.cfg.loss.kl_trajectory_weight > 0:
            return True
        return self.cfg.loss.kl_prefix_weight > 0 and bool(batch.from_student.any())

    def loss(self, batch: StateBatch, denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        """kl_trajectory_weight * L_traj + kl_prefix_weight * L_prefix for one micro-batch.

        `denominator` is the normaliser of the whole optimiser step (tokens or sequences across every
        micro-batch), so accumulated gradients equal those of one large batch.
        """
        cfg = self.cfg.loss
        targets, mask = batch.responses.tokens, batch.responses.mask
        student_logits = response_logits(self.student, batch)
        teacher_logits = None
        if self.needs_teacher_logits(batch):
            with torch.inference_mode():
                teacher_logits = response_logits(self.teacher, batch)
            teacher_logits = teacher_logits.clone()  # a normal tensor, usable by autograd
        common = dict(normalization=cfg.normalization, denominator=denominator)
        total = student_logits.new_zeros(())
        parts = {}
        if cfg.kl_trajectory_weight > 0:
            traj = trajectory_loss(
                student_logits, teacher_logits, targets, mask, trajectory=self.cfg.trajectory.supervisor,
                spec=self.spec, estimator=cfg.estimator, top_k=cfg.top_k, **common,
            )
            total = total + cfg.kl_trajectory_weight * traj
            parts["loss_trajectory"] = float(traj)
        if cfg.kl_prefix_weight > 0:
            pre = student_logits.new_zeros(())
            for states, rows in (("student", batch.from_student), ("fixed", ~batch.from_student)):
                if rows.any():
                    pre = pre + prefix_loss(
                        student_logits[rows], None if teacher_logits is None else teacher_logits[rows],
                        targets[rows], mask[rows], states=states, gamma=cfg.gamma, baseline=cfg.baseline,
                        spec=self.spec or DivergenceSpec("reverse_kl"), **common,
                    )
            total = total + cfg.kl_prefix_weight * pre
            parts["loss_prefix"] = float(pre)
        del student_logits, teacher_logits
        return total, parts

    def step(self) -> StepStats:
        """One optimiser step over trainer.grad_accum micro-batches."""
        t = self.cfg.trainer
        stats = StepStats()
        self.student.eval()  # sampling states: no dropout
        batches = []
        for _ in range(t.grad_accum):
            batch, counts = self.states.build(self.next_examples(t.batch_size), self.generator)
            batches.append(batch)
            stats.tokens.add(counts)
        self.student.train()
        tokens = sum(b.responses.num_tokens for b in batches)
        denominator = float(tokens if self.cfg.loss.normalization == "token" else sum(b.num_sequences for b in batches))
        self.optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            loss, parts = self.loss(batch, denominator)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {float(loss)} at step {self.scheduler.last_epoch}; "
                    "lower trainer.lr or raise loss.temperature, then rerun"
                )
            loss.backward()
            stats.loss += float(loss)
            for k, v in parts.items():
                stats.parts[k] = stats.parts.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        stats.parts["grad_norm"] = float(grad_norm)
        stats.parts["lr"] = self.scheduler.get_last_lr()[0]
        stats.trained_tokens = tokens
        forward_passes = 2 if self.needs_teacher_logits(batches[0]) else 1
        stats.tokens.scored += tokens * forward_passes
        return stats


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
