"""Typed configuration: the schema every config file and override is checked against, each section with
its own checks beside it (the axes and the loss in kltd.spec.axes, the other sections in
kltd.spec.sections); here the whole run's config, the rules that join sections, and make-data's config.

Plain dataclasses; the Hydra entry point (kltd.app.train_command) registers them as the schema and turns
the composed config into these objects. `Config.check()` refuses bad values and invalid combinations
before anything expensive happens; it reads no files (kltd.train.preflight checks those). Nothing here
imports Hydra or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kltd.spec.axes import LossConfig, PrefixConfig, TrajectoryConfig
from kltd.spec.checks import ConfigError, at_least, choice, in_unit_interval
from kltd.spec.matrix import cell_error, direction_error, method_label
from kltd.spec.sections import (CacheConfig, DataConfig, DataFields, DistributedConfig, EvalConfig, ModelConfig,
                                SamplingConfig, TrainerConfig, WandbConfig)

# the sections are imported from here by the rest of kltd: one place to name a config class from
__all__ = ["CacheConfig", "Config", "ConfigError", "DataConfig", "DataFields", "DistributedConfig", "EvalConfig",
           "LossConfig", "MakeDataConfig", "ModelConfig", "PrefixConfig", "SamplingConfig", "TrainerConfig",
           "TrajectoryConfig", "WandbConfig", "config_method_label", "validate"]


def _check_data_parallel(cfg: Config) -> None:
    """What data parallelism needs of the other sections."""
    n = cfg.distributed.nproc_per_node
    if n == 1:
        return
    if cfg.trainer.batch_size % n:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} must be a multiple of "
                          f"distributed.nproc_per_node={n} (each process trains on batch_size / {n} rows)")
    if cfg.sampling.backend == "vllm":
        raise ConfigError("sampling.backend=vllm runs one engine in one process; with distributed.nproc_per_node > 1 "
                          "use sampling.backend=kltd")
    if cfg.model.teacher_device is not None:
        raise ConfigError("model.teacher_device places the teacher of a one-process run; with "
                          "distributed.nproc_per_node > 1 each process keeps its teacher on its own device")
    # the batch_mean baseline is summed across processes; with a mixed prefix a process may hold no
    # student-written rows in a micro-batch, and would then miss that collective
    # a sharded student's passes are collectives, and with a mixed prefix a process may have no rows to sample
    if cfg.distributed.strategy == "fsdp" and cfg.prefix.source == "mixed":
        raise ConfigError("distributed.strategy=fsdp with prefix=mixed is not built (processes would sample unequal "
                          "numbers of student rows); use distributed.strategy=ddp")
    if cfg.loss.kl_prefix_weight > 0 and cfg.loss.baseline == "batch_mean" and cfg.prefix.source == "mixed":
        raise ConfigError("loss.baseline=batch_mean with prefix=mixed couples rows that data parallelism splits "
                          "unevenly; use loss.baseline=leave_one_out or none, or distributed.nproc_per_node=1")


@dataclass
class Config:
    seed: int = 0
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def method(self) -> str:
        return config_method_label(self)

    def check(self) -> None:
        """Every section, then the rules that join sections (no file is read, no model is loaded)."""
        self.prefix.check()
        self.trajectory.check()
        error = cell_error(self.prefix.source, self.trajectory.supervisor)
        if error:
            raise ConfigError(error)
        for section in (self.loss, self.model, self.data, self.sampling, self.trainer, self.eval, self.cache,
                        self.wandb, self.distributed):
            section.check()
        _check_loss_against_axes(self)
        _check_data_parallel(self)
        if self.cache.teacher == "on" and self.prefix.source != "fixed":
            raise ConfigError("cache.teacher=on caches teacher logits at fixed states; it needs prefix=fixed")
        if self.data.responses_file is not None and self.prefix.source not in ("fixed", "mixed"):
            raise ConfigError("data.responses_file supplies fixed states; use prefix=fixed (or mixed)")
        if self.eval.num_prompts > self.data.n_eval:
            raise ConfigError(f"eval.num_prompts={self.eval.num_prompts} exceeds data.n_eval={self.data.n_eval}")
        if self.sampling.backend == "vllm" and len(self.prefix.sampling_models()) > 1:
            raise ConfigError("sampling.backend=vllm runs one engine, and this prefix samples from both the student "
                              "and the teacher; use sampling.backend=kltd")
        if self.trajectory.reward == "correctness" and self.data.checker_name == "none":
            raise ConfigError("trajectory.reward=correctness grades responses with an answer checker; set "
                              "data.checker (exact, gsm8k or boxed)")


@dataclass
class MakeDataConfig:
    """`kltd make-data`: responses sampled from a model for the training prompts of `data`, written as JSONL
    in TRL's format (prompt, completion, answer, source), for SeqKD and offline RL."""

    out: Optional[str] = None  # the JSONL file to write
    n: int = 5000  # rows (at most the training split's size)
    writer: str = "student"  # student | teacher: the model that writes the responses
    other_fraction: float = 0.0  # per row, the probability that the other model writes instead
    batch_size: int = 256
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def check(self) -> None:
        if not self.out:
            raise ConfigError("make-data needs out=FILE, the JSONL file to write")
        at_least("n", self.n, 1)
        at_least("batch_size", self.batch_size, 1)
        choice("writer", self.writer, ("student", "teacher"))
        in_unit_interval("other_fraction", self.other_fraction)
        for section in (self.model, self.data, self.sampling):
            section.check()


def _check_loss_against_axes(cfg: Config) -> None:
    loss, supervisor, states = cfg.loss, cfg.trajectory.supervisor, cfg.prefix.source
    if supervisor == "dataset" and loss.divergence is not None:
        raise ConfigError("loss.divergence has no effect with trajectory=dataset (cross-entropy); remove it")
    error = direction_error(supervisor, loss.divergence, **loss.parameters)
    if error:
        raise ConfigError(error)
    if loss.estimator.startswith("sampled"):
        # a one-token estimator is only unbiased at tokens drawn from the very distribution it assumes
        wanted = {"student": "student", "expert": "teacher"}.get(supervisor)
        if states != wanted:
            raise ConfigError(f"loss.estimator={loss.estimator} needs tokens sampled by the "
                              f"{'student' if wanted == 'student' else 'teacher'}: use prefix={wanted} "
                              f"with trajectory={supervisor}, or loss.estimator=exact")
        if cfg.sampling.top_p < 1 or cfg.sampling.temperature != loss.temperature:
            raise ConfigError(f"loss.estimator={loss.estimator} assumes tokens drawn from the full softmax at "
                              f"loss.temperature={loss.temperature:g}; the sampler uses sampling.top_p="
                              f"{cfg.sampling.top_p:g}, sampling.temperature={cfg.sampling.temperature:g}. "
                              "Use sampling.top_p=1 and equal temperatures, or loss.estimator=exact")
    if loss.kl_prefix_weight > 0 and states in ("student", "mixed") and cfg.sampling.temperature == 0:
        raise ConfigError("loss.kl_prefix_weight > 0 needs sampled student states (a score function); "
                          "greedy sampling.temperature=0 has none: set sampling.temperature > 0")


def validate(cfg: Config) -> None:
    """Refuse invalid cells and values before anything expensive happens (no file read, no model loaded)."""
    cfg.check()


def config_method_label(cfg) -> str:
    """The method label of a config (typed, or an OmegaConf node with the same keys)."""
    p, t, loss = cfg.prefix, cfg.trajectory, cfg.loss
    return method_label(p.source, t.supervisor, reward=t.reward, handoff=p.handoff, divergence=loss.divergence,
                        beta=loss.beta, alpha=loss.alpha, mix=loss.mix, student_fraction=p.student_fraction,
                        kl_prefix_weight=loss.kl_prefix_weight)
