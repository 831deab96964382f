"""One trainer for every cell of the method matrix.

    kltd train                                          # 1 device (CUDA if present, else CPU)
    kltd train prefix=student trajectory=expert         # DAgger
    kltd train -m prefix=fixed,student trajectory=expert,student

Each step: draw states from the prefix source, score them with the student (grad) and the teacher
(inference_mode), form kl_trajectory_weight * L_traj + kl_prefix_weight * L_prefix, step AdamW. Models are
run through one seam (kltd.rollout.scoring.Scorer, a kltd.rollout.sampling.StateSampler) as the job's execution
plan (kltd.rollout.plan) says: the trainer never chooses between the fast path and the models' own forward, nor
between samplers, itself.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from kltd.data.order import ExampleOrder
from kltd.objectives.divergences import DivergenceSpec
from kltd.objectives.fused_head import fused_divergence
from kltd.objectives.losses import dataset_loss, prefix_loss, trajectory_loss
from kltd.objectives.rewards import checker_rewards, sequence_weights, teacher_loglik
from kltd.objectives.tied_gradient import GradientHandoff
from kltd.objectives.topk_teacher import TopKTeacher
from kltd.rollout.batch import StateBatch, TokenCounts, decode_responses
from kltd.rollout.horizon import Horizon
from kltd.rollout.noise import RowNoise
from kltd.rollout.plan import ExecutionPlan, loss_is_sum_over_rows, plan_for
from kltd.rollout.remote_teacher import RemoteSampler
from kltd.rollout.sampling import Sampler, StateSampler
from kltd.rollout.scoring import Scorer
from kltd.rollout.states import StateSource
from kltd.schema.config import Config
from kltd.schema.matrix import own_divergence
from kltd.train.compute import FlopCounter, ModelShape, batch_flops, sampling_flops, sequence_flops, \
    training_flops
from kltd.train.optim import adamw
from kltd.train.ranks import SINGLE, Ranks
from kltd.train.sharding import gathered_optimizer_state, scattered_optimizer_state, whole


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


def divergence_spec(cfg: Config, step: int = 1) -> DivergenceSpec | None:
    """The per-token divergence of the trajectory term at optimiser step `step` (1-based): the configured blend
    (a scheduled kl_mix at that step's weight), else the trajectory's own."""
    own = own_divergence(cfg.trajectory.supervisor)
    if own is None:
        return None
    loss = cfg.loss
    return DivergenceSpec(name=loss.divergence or own, beta=loss.beta, alpha=loss.alpha,
                          mix=loss.mix_at(step, cfg.trainer.max_steps), temperature=loss.temperature)


@dataclass
class StepStats:
    loss: float = 0.0
    parts: dict = field(default_factory=dict)
    tokens: TokenCounts = field(default_factory=TokenCounts)
    trained_tokens: int = 0  # supervised positions
    real_tokens: int = 0  # prompt and response tokens of the scored batches (what a forward pass computes)
    flops: FlopCounter = field(default_factory=FlopCounter)  # this step's (kltd.train.compute), every process's


def vllm_sampler(cfg: Config, role: str, model, tokenizer, vocab: int | None) -> StateSampler:
    """A vLLM engine for `model` (model.<role>'s directory), given the live model's weights at once."""
    from kltd.rollout.vllm_sampler import EngineOptions, VllmSampler
    from kltd.train.models import model_directory

    s = cfg.sampling
    # a LoRA student's engine runs the plain architecture: it is given the merged weights (base + adapter)
    merged = None
    if role == "student" and cfg.model.lora.enabled:
        from kltd.train.lora import merged_weights as merged
    options = EngineOptions(model_dir=str(model_directory(getattr(cfg.model, role))), seed=cfg.seed,
                            gpu_memory_utilization=s.vllm_memory, weights=merged)
    return VllmSampler(model, tokenizer, s.max_new_tokens, s.temperature, s.top_p, vocab, options=options)


class Trainer:
    """Owns the optimiser, the schedule, the state source and the data order of one run.

    checker(response_text, example) -> bool grades a response (the correctness reward of offline RL).
    order: the data order (default: seeded shuffles of the training examples, epoch after epoch).
    ranks: this process's place in a data-parallel run (kltd.train.ranks); every process draws the same
    global batch and trains on its share of the rows.
    plan: how the models run (kltd.rollout.plan; default: the plan for this config and these models).
    """

    def __init__(self, cfg: Config, pair, train_examples: list, checker: Callable[[str, object], bool] | None = None,
                 order: ExampleOrder | None = None, ranks: Ranks = SINGLE, plan: ExecutionPlan | None = None):
        self.cfg = cfg
        self.ranks = ranks
        self.student, self.teacher, self.tokenizer = pair.student, pair.teacher, pair.tokenizer
        # a teacher served by another process (model.teacher_server): self.teacher is None, this scores and samples
        self.served = getattr(pair, "remote_teacher", None)
        self.device = pair.device
        self.examples = train_examples
        self.checker = checker
        self.spec = divergence_spec(cfg)
        t = cfg.trainer
        self.vocab = pair.vocab_size or None
        self.plan = plan or plan_for(cfg, self.student, self.teacher, self.vocab)
        self.scorers = {role: Scorer(packed=route.packed, vocab=self.vocab) for role, route in self.plan.training.items()}
        # a LoRA student's peft wrapper (kltd.train.lora): checkpoints save its adapter
        self.adapter = getattr(pair, "adapter", None)
        # the parameters that train: all of the student's, or a LoRA student's adapter only (the base is frozen)
        self.optimizer = adamw(self.student.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        self.states = StateSource(cfg.prefix, student=self._sampler("student"), teacher=self._sampler("teacher"),
                                  tokenizer=self.tokenizer)
        self.horizon = Horizon.of(cfg.sampling)  # sampling.length_schedule; the job's evaluations gate it
        self.steps_done = 0
        self.skipped_steps = 0  # steps whose loss or gradients were not finite (trainer.skip_bad_steps)
        self.teacher_forwards = 0  # live teacher passes during training (the cache avoids them)
        self.teacher_cache = None
        teacher_shape = (ModelShape.of(self.teacher) if self.served is None
                         else ModelShape.from_config(SimpleNamespace(**self.served.info["config"])))
        self.shapes = {"student": ModelShape.of(self.student), "teacher": teacher_shape}
        self.flops = FlopCounter()  # the run's, all processes (kltd.train.compute); cache_fill: see count_cache_fill
        self.cache_fill_flops = 0  # this process's teacher forwards filling the teacher cache, not yet in self.flops
        self.order = order or ExampleOrder(len(train_examples), cfg.seed)

    def _sampler(self, role: str) -> StateSampler:
        """What the plan says draws the model's states: kltd's sampler (its lean decoder or the model's own
        forward), or a vLLM engine that starts from the model's directory and is given its live weights."""
        s, route = self.cfg.sampling, self.plan.training[role]
        model = self.student if role == "student" else self.teacher
        if role == "teacher" and self.served is not None:
            return RemoteSampler(self.served, s.max_new_tokens, s.temperature, s.top_p)
        if route.decoder != "vllm":
            # a sharded student's forward passes are collectives: the processes decode in step
            return Sampler(model, self.tokenizer, s.max_new_tokens, s.temperature, s.top_p, route.decoder == "lean",
                           self.vocab, lockstep=self.ranks.any if route.lockstep else None)
        return vllm_sampler(self.cfg, role, model, self.tokenizer, self.vocab)

    def _push_weights(self) -> None:
        """The student's sampler samples from its weights as of now (a vLLM engine is given them; kltd's sampler
        reads the live weights anyway). A teacher's sampler keeps the weights it has."""
        self.states.student.push_weights(self.student, step=self.steps_done)

    def close(self) -> None:
        """Stop what the trainer started outside PyTorch (a vLLM engine)."""
        for sampler in (self.states.student, self.states.teacher):
            sampler.close()

    def state_dict(self) -> dict:
        """Everything besides the student's weights that the next step depends on: optimiser, schedule, the
        global random streams, the data position and the counters (kltd.train.checkpoint saves it). The
        states' draws are keyed by step and row (kltd.rollout.noise), so they need no saved state."""
        return {"optimizer": gathered_optimizer_state(self.optimizer), "scheduler": self.scheduler.state_dict(),
                "steps_done": self.steps_done, "horizon": self.horizon.state_dict(), **self.run_state()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(scattered_optimizer_state(state["optimizer"], self.optimizer))
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = state["steps_done"]
        self.horizon.load_state_dict(state.get("horizon"))
        self._push_weights()  # the restored weights (kltd.train.checkpoint loads them first)
        self.load_run_state(state)

    def run_state(self) -> dict:
        """What every stage of the run shares and a checkpoint keeps (the distillation's, then the RL stage's): the
        global random streams, the data position, the counters and the FLOPs."""
        return {"teacher_forwards": self.teacher_forwards, "order_position": self.order.position,
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "skipped_steps": self.skipped_steps, "flops": dataclasses.asdict(self.flops)}

    def load_run_state(self, state: dict) -> None:
        """run_state's part of a checkpoint, the random streams last (after any weights are pushed)."""
        self.teacher_forwards, self.skipped_steps = state["teacher_forwards"], state["skipped_steps"]
        self.flops = FlopCounter(**state.get("flops", {}))  # a checkpoint from before compute accounting: 0
        self.order.seek(state["order_position"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    @property
    def group_size(self) -> int:
        """Samples of each prompt, side by side (sampling.samples_per_prompt)."""
        return self.cfg.sampling.samples_per_prompt

    @property
    def examples_per_step(self) -> int:
        return self.cfg.trainer.grad_accum * self.cfg.trainer.batch_size // self.group_size

    def next_states(self, micro: int) -> tuple[StateBatch, TokenCounts]:
        """This process's share of micro-batch `micro` of the current step (the whole of it in one process)."""
        return self.grouped_states(self.states, self.cfg.trainer.batch_size, self.group_size, micro, self.steps_done)

    def grouped_states(self, states: StateSource, rows: int, group: int, micro: int, step: int
                       ) -> tuple[StateBatch, TokenCounts]:
        """This process's share of micro-batch `micro` of `rows` states drawn by `states` at `step`, in groups of
        `group` samples of each of the next rows / group prompts of the data order: each prompt's samples are
        consecutive rows, a process's share is whole groups (the config checks that rows is a multiple of the
        group size x processes), and every sample has its own noise (its place in the step's global batch)."""
        examples = [e for e in self.next_examples(rows // group) for _ in range(group)]
        share = self.ranks.share(len(examples))
        noise = RowNoise(self.cfg.seed, step, tuple(micro * len(examples) + i for i in share))
        return states.build([examples[i] for i in share], noise, step)

    def next_examples(self, n: int) -> list:
        """The next n examples of the data order (epochs over the training split, each freshly shuffled)."""
        return [self.examples[i] for i in self.order.take(n)]

    def planned_examples(self) -> list:
        """The examples the rest of the run will draw, in order (a preview of next_examples)."""
        remaining = self.cfg.trainer.max_steps - self.steps_done
        return [self.examples[i] for i in self.order.peek(remaining * self.examples_per_step)]

    def uses_teacher_cache(self) -> bool:
        """auto: cache whenever the states are fixed and the loss needs the teacher's logits at them."""
        return self.plan.teacher_cache

    def attach_teacher_cache(self, cache) -> None:
        self.teacher_cache = cache

    def _loss_needs_teacher(self, fixed_states: bool) -> bool:
        traj, loss = self.cfg.trajectory, self.cfg.loss
        if loss.kl_trajectory_weight > 0 and (traj.supervisor != "dataset" or traj.reward == "teacher_loglik"):
            return True
        return loss.kl_prefix_weight > 0 and not fixed_states

    def cache_serves(self, batch: StateBatch) -> bool:
        """The cache holds fixed states only; any student-written row goes to the live teacher."""
        return self.teacher_cache is not None and not bool(batch.from_student.any())

    def teacher_logits(self, batch: StateBatch) -> torch.Tensor | TopKTeacher:
        if self.cache_serves(batch):
            return self.teacher_cache.lookup(batch)
        if self.served is not None:  # top-k and tail at the loss's temperature (kltd.objectives.topk_teacher)
            self.teacher_forwards += 1
            return self.served.score(batch, self.spec.temperature if self.spec else 1.0, self.vocab)
        with torch.inference_mode():
            logits = self.scorers["teacher"].logits(self.teacher, batch)
        self.teacher_forwards += 1
        return logits.clone()  # a normal tensor again, usable by autograd

    def count_cache_fill(self, batch: StateBatch) -> None:
        """The teacher's forward over a batch of fixed states while this process fills the teacher cache (the
        job adds the processes' sum to self.flops once the cache is filled)."""
        self.cache_fill_flops += batch_flops(self.shapes["teacher"], batch)

    def needs_teacher_logits(self, batch: StateBatch) -> bool:
        return self._loss_needs_teacher(fixed_states=not bool(batch.from_student.any()))

    def dataset_weights(self, batch: StateBatch, teacher_logits) -> torch.Tensor | None:
        """Offline RL: per-sequence weights from the configured return, or None for plain BC."""
        traj = self.cfg.trajectory
        if traj.reward == "none":
            return None
        if traj.reward == "teacher_loglik":
            rewards = teacher_loglik(teacher_logits, batch.responses.tokens, batch.responses.mask)
        else:
            if self.checker is None:
                raise TrainingError("trajectory.reward=correctness needs an answer checker for this data")
            texts = decode_responses(self.tokenizer, batch.responses)
            rewards = torch.tensor(checker_rewards(self.checker, texts, batch.examples), device=self.device)
        # the weights compare a row with the whole micro-batch, other processes' rows included
        everyone = self.ranks.gather_rows(rewards)
        weights = sequence_weights(everyone, traj.weighting, keep_fraction=traj.keep_fraction,
                                   temperature=traj.awr_temperature, max_weight=traj.awr_max_weight)
        return weights[self.ranks.rank * len(rewards) : (self.ranks.rank + 1) * len(rewards)]

    def loss_is_sum_over_rows(self) -> bool:
        """True unless a batch-level term couples the rows (prefix-term baselines, offline-RL weights)."""
        return loss_is_sum_over_rows(self.cfg)

    def can_fuse(self) -> bool:
        """The plan's choice: the exact trajectory divergence from hidden states (no logits tensor)."""
        return self.plan.fused_head

    def fused_loss(self, batch: StateBatch, denominator: float) -> torch.Tensor:
        """kl_trajectory_weight * L_traj from hidden states; equals the logits path (tested)."""
        student, teacher = self.scorers["student"], self.scorers["teacher"]
        handoff = GradientHandoff()  # a tied embedding and output matrix then get one [V, H] gradient, not two
        hidden = student.hidden_states(self.student, batch, handoff)
        if self.cache_serves(batch):
            teacher_rows = self.teacher_cache.lookup(batch)[batch.supervised]
            rows = lambda part: teacher_rows[part]  # noqa: E731
        else:
            with torch.inference_mode():
                teacher_hidden = teacher.hidden_states(self.teacher, batch)
            self.teacher_forwards += 1
            teacher_head = teacher.output_weight(self.teacher).to(teacher_hidden.device)
            rows = lambda part: (teacher_hidden[part] @ teacher_head.T).float()  # noqa: E731
        weights = torch.full((hidden.shape[0],), 1.0 / denominator, device=hidden.device)
        head = student.output_weight(self.student)
        return self.cfg.loss.kl_trajectory_weight * fused_divergence(hidden, head, rows, weights, self.spec,
                                                                     handoff=handoff)

    def loss(self, batch: StateBatch, denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        """kl_trajectory_weight * L_traj + kl_prefix_weight * L_prefix for one micro-batch.

        `denominator` is the normaliser of the whole optimiser step (tokens or sequences across every
        micro-batch), so accumulated gradients equal those of one large batch.
        """
        cfg = self.cfg.loss
        if self.plan.fused_head:
            total = self.fused_loss(batch, denominator)
            return total, {"loss_trajectory": float(total.detach()) / cfg.kl_trajectory_weight}
        targets, mask = batch.responses.tokens, batch.supervised
        student_logits = self.scorers["student"].logits(self.student, batch)
        teacher_logits = self.teacher_logits(batch) if self.needs_teacher_logits(batch) else None
        common = dict(normalization=cfg.normalization, denominator=denominator)
        total = student_logits.new_zeros(())
        parts = {}
        if cfg.kl_trajectory_weight > 0 and self.cfg.trajectory.supervisor == "dataset":
            weights = self.dataset_weights(batch, teacher_logits)
            traj = dataset_loss(student_logits, targets, mask, weights, **common)
            if weights is not None:
                parts["mean_weight"] = float(weights.mean())
        elif cfg.kl_trajectory_weight > 0:
            traj = trajectory_loss(
                student_logits, teacher_logits, targets, mask, trajectory=self.cfg.trajectory.supervisor,
                spec=self.spec, estimator=cfg.estimator, top_k=cfg.top_k, **common,
            )
        if cfg.kl_trajectory_weight > 0:
            total = total + cfg.kl_trajectory_weight * traj
            parts["loss_trajectory"] = float(traj.detach())
        if cfg.kl_prefix_weight > 0:
            pre = self.prefix_term(batch, student_logits, teacher_logits, common)
            total = total + cfg.kl_prefix_weight * pre
            parts["loss_prefix"] = float(pre.detach())
        del student_logits, teacher_logits
        return total, parts

    def prefix_term(self, batch: StateBatch, student_logits, teacher_logits, common: dict) -> torch.Tensor:
        """L_prefix: a score-function term on the rows the student wrote (returns: the divergence at the
        supervised positions after each token), cross-entropy on the prefix of the other rows."""
        cfg, sampling = self.cfg.loss, self.cfg.sampling
        targets, mask, rows = batch.responses.tokens, batch.supervised, batch.from_student
        pre = student_logits.new_zeros(())

        def pick(x, which):  # no copy of the logits when every row is of one kind
            return x if x is None or bool(which.all()) else x[which]

        if rows.any():
            pre = pre + prefix_loss(
                pick(student_logits, rows), pick(teacher_logits, rows), pick(targets, rows), pick(mask, rows),
                states="student", gamma=cfg.gamma, baseline=cfg.baseline, group_size=sampling.samples_per_prompt,
                spec=self.spec or DivergenceSpec("reverse_kl"), score_mask=pick(batch.student_written, rows),
                sampling_temperature=sampling.temperature, sampling_top_p=sampling.top_p,
                batch_sum=self.ranks.sum_positions, **common,
            )
        if (~rows).any():  # states independent of theta: cross-entropy on the prefix tokens
            pre = pre + prefix_loss(pick(student_logits, ~rows), None, pick(targets, ~rows), pick(mask, ~rows),
                                    states="fixed", **common)
        return pre

    def bad_step(self, what: str, step: int | None = None) -> None:
        """A step with a non-finite loss or gradient (`step`, default this trainer's next): skipped (no update) while
        trainer.skip_bad_steps allows."""
        if self.skipped_steps >= self.cfg.trainer.skip_bad_steps:
            allowed = self.cfg.trainer.skip_bad_steps
            raise TrainingError(f"{what} at step {step or self.steps_done + 1}"
                                + (f" ({allowed} bad steps skipped already)" if allowed else "")
                                + "; lower trainer.lr or raise loss.temperature, then rerun (the last good "
                                "checkpoint is kept; trainer.skip_bad_steps=N skips a few such steps instead)")
        self.skipped_steps += 1

    def step(self) -> StepStats:
        """One optimiser step over trainer.grad_accum micro-batches (this process's rows of each)."""
        t = self.cfg.trainer
        stats = StepStats()
        if self.cfg.loss.mix_schedule != "constant":  # this step's weight of reverse KL (the spec depends on the step)
            self.spec = divergence_spec(self.cfg, self.steps_done + 1)
            stats.parts["mix"] = self.spec.mix
        if self.horizon.scheduled:  # this step's horizon of the sampled states
            stats.parts["max_new_tokens"] = self.states.set_horizon(self.horizon.length(self.steps_done + 1))
        staleness = self.states.student.staleness(self.steps_done)
        if staleness is not None:  # optimiser steps between the engine's weights and the student's
            stats.parts["sampler_staleness"] = float(staleness)
        self.student.eval()  # sampling states: no dropout
        batches = []
        for micro in range(t.grad_accum):
            try:
                batch, counts = self.next_states(micro)
            except FloatingPointError as error:
                raise TrainingError(f"sampling failed at step {self.steps_done + 1}: {error}; lower trainer.lr "
                                    "and rerun (the last good checkpoint is kept)") from None
            batches.append(batch)
            stats.tokens.add(counts)
            sampled = sampling_flops(batch, self.cfg.prefix, self.shapes["student"], self.shapes["teacher"])
            stats.flops.student_sampling += sampled[0]
            stats.flops.teacher_sampling += sampled[1]
        self.student.train()
        local_tokens = sum(int(b.supervised.sum()) for b in batches)
        tokens, sequences = self.ranks.sum([local_tokens, sum(b.num_sequences for b in batches)])
        denominator = float(tokens if self.cfg.loss.normalization == "token" else sequences)
        self.optimizer.zero_grad(set_to_none=True)
        groups = self.plan.length_groups
        bad = None
        for batch in (part for b in batches for part in b.by_length(groups)):
            teacher_passes = self.teacher_forwards
            loss, parts = self.loss(batch, denominator)
            finite = bool(torch.isfinite(loss))
            # counted where the step waits for the device anyway: the student's forward (and backward), the live
            # teacher's forward when the loss ran one (the cache's lookups cost nothing here)
            lengths = batch.attention_mask.sum(1).tolist()
            stats.flops.student_train += (training_flops if finite else sequence_flops)(self.shapes["student"], lengths)
            stats.flops.teacher_score += ((self.teacher_forwards - teacher_passes)
                                          * sequence_flops(self.shapes["teacher"], lengths))
            if not finite:
                bad = f"the loss became {float(loss.detach())}"
                break
            loss.backward()
            stats.loss += float(loss.detach())
            stats.real_tokens += sum(lengths)
            for k, v in parts.items():
                stats.parts[k] = stats.parts.get(k, 0.0) + v
        self.ranks.sum_gradients(self.student.parameters())
        if self.ranks.any(bad is not None) and bad is None:
            bad = "the loss became non-finite in another process"
        grad_norm = (whole(torch.nn.utils.clip_grad_norm_(self.student.parameters(), t.max_grad_norm))
                     if bad is None else None)
        if bad is None and not torch.isfinite(grad_norm):
            bad = f"the gradient norm became {float(grad_norm)}"
        self._gather_stats(stats)
        self.flops.add(stats.flops)
        if bad is not None:
            self.bad_step(bad)
            self.optimizer.zero_grad(set_to_none=True)
            stats.loss, stats.parts = float("nan"), {"skipped": 1.0}
        else:
            self.optimizer.step()
        self.scheduler.step()
        if grad_norm is not None:
            stats.parts["grad_norm"] = float(grad_norm)
        stats.parts["lr"] = self.scheduler.get_last_lr()[0]
        self.steps_done += 1
        if self.steps_done % self.cfg.sampling.vllm_sync_every == 0:
            self._push_weights()
        stats.trained_tokens = int(tokens)
        forward_passes = 2 if self.needs_teacher_logits(batches[0]) else 1
        stats.tokens.scored += stats.trained_tokens * forward_passes  # student and (live or cached) teacher scores
        return stats

    # parts of the loss that add up across processes (each is its rows' sum over the global denominator)
    SUMMED_PARTS = ("loss_trajectory", "loss_prefix")

    def _gather_stats(self, stats: StepStats) -> None:
        """The whole step's figures in every process: losses and token counts summed over processes."""
        if self.ranks.world == 1:
            return
        c = stats.tokens
        local = [stats.loss, stats.real_tokens, c.student_generated, c.teacher_generated,
                 stats.parts.get("mean_weight", 0.0), *(stats.parts.get(k, 0.0) for k in self.SUMMED_PARTS)]
        total = self.ranks.sum(local + stats.flops.values())  # float64: FLOPs exact to 2^53 a step
        total, flops = total[: len(local)], total[len(local) :]
        stats.flops = FlopCounter.from_sums(flops)
        stats.loss, stats.real_tokens = total[0], int(total[1])
        c.student_generated, c.teacher_generated = int(total[2]), int(total[3])
        if "mean_weight" in stats.parts:
            stats.parts["mean_weight"] = total[4] / self.ranks.world
        for key, value in zip(self.SUMMED_PARTS, total[5:]):
            if key in stats.parts:
                stats.parts[key] = value
