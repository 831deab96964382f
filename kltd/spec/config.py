"""Typed configuration: the schema every config file and override is checked against.

Plain dataclasses; the Hydra entry point (kltd/train_app.py) registers them as the schema and turns the
composed config into these objects. Nothing here imports Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kltd.spec.matrix import PREFIXES, TRAJECTORIES, cell_error, method_label


class ConfigError(ValueError):
    """A user error in the configuration: reported as one line, no traceback."""


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
    # continues (roll-in / roll-out). k is "fixed" (handoff_k), "uniform" over the reference
    # response's length, or "geometric" (success probability handoff_p, starting at 0).
    handoff: bool = False
    handoff_k: str = "uniform"
    handoff_k_value: int = 4
    handoff_p: float = 0.2
    supervise: str = "all"  # all | after_handoff: which positions of a hand-off row are supervised


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


@dataclass
class LossConfig:
    kl_trajectory_weight: float = 1.0
    kl_prefix_weight: float = 0.0
    # None: the trajectory's own divergence (expert -> forward_kl, student -> reverse_kl).
    divergence: Optional[str] = None
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skew KLs
    mix: float = 0.5  # kl_mix: weight of reverse KL
    temperature: float = 1.0
    estimator: str = "exact"  # exact | topk | sampled_k1 | sampled_k2 | sampled_k3 | sampled_reward
    top_k: int = 8
    normalization: str = "token"  # token | sequence
    gamma: float = 1.0  # prefix term discount
    baseline: str = "batch_mean"  # prefix term baseline: none | batch_mean | leave_one_out


@dataclass
class ModelConfig:
    name: str = "toy"
    # "toy/teacher" and "toy/student" are the pair shipped inside the package; anything else is a local
    # directory or a Hugging Face model id.
    teacher: str = "toy/teacher"
    student: str = "toy/student"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class DataConfig:
    name: str = "addition"
    seed: int = 0
    n_train: int = 20000
    n_eval: int = 500
    min_terms: int = 2
    max_terms: int = 5
    # a JSONL file of responses to train on (`kltd make-data` writes one); null: the task's correct ones
    responses_file: Optional[str] = None


@dataclass
class SamplingConfig:
    """How teacher and student sample training states."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    # decode Llama/Qwen2/Qwen3 models with kltd's preallocated-cache decoder (same logits, less overhead);
    # false: always the model's own forward
    lean_decoder: bool = True


@dataclass
class TrainerConfig:
    max_steps: int = 200
    batch_size: int = 32
    grad_accum: int = 1
    # score each micro-batch in up to this many groups of rows of similar length, so padding columns are
    # not computed (only for losses that are sums over rows); 1: off
    length_groups: int = 4
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 10
    # with the exact divergence loss, score Llama/Qwen2/Qwen3 models on their real tokens only, packed
    # (kltd.fast.packed; same hidden states); batches are then not split into length groups. false: the
    # models' own forward over the padded batch
    packed_forward: bool = True
    # exact divergence losses straight from hidden states, chunk by chunk (no [B, T, V] logits) where the
    # output layer allows it; false: the reference path through full logits
    fused_head: bool = True
    # CPU threads for PyTorch. 0: one thread when both models are small (the toy pair), where a second
    # thread only adds synchronisation and, on a busy machine, stalls every tiny matmul; else torch's default.
    num_threads: int = 0
    # keep freed memory in the process for reuse (glibc malloc; kltd.fast.memory): saves the page faults of
    # re-allocating the same tensors every step, and the process holds its peak memory until it exits
    keep_freed_memory: bool = True
    save_checkpoint: bool = True
    progress: bool = True


@dataclass
class EvalConfig:
    num_prompts: int = 200
    batch_size: int = 200  # prompts per sampling call (x pass_k rows); large batches amortise per-token overhead
    max_new_tokens: int = 64
    every: int = 0  # evaluate every N steps as well as before and after; 0 = before and after only
    before: bool = True  # false skips the evaluation before training (identical for every cell of a sweep)
    seed: int = 1234  # fixed, so that every cell is evaluated on identical samples
    pass_k: int = 4  # student samples per prompt for pass@k and the sequence reverse KL


@dataclass
class CacheConfig:
    """The teacher cache for fixed states (kltd/teacher_cache.py)."""

    teacher: str = "auto"  # auto: on when prefix=fixed needs teacher logits | on | off
    dir: str = "outputs/cache"
    format: str = "full"  # full (exact) | topk (k logits per position, the rest spread evenly)
    top_k: int = 64


@dataclass
class WandbConfig:
    project: str = "kltd"
    entity: Optional[str] = None
    # auto: online when credentials exist, else offline (one line says so); or online | offline | disabled
    mode: str = "auto"
    init_timeout_s: float = 30.0


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

    @property
    def method(self) -> str:
        return config_method_label(self)


def _choice(key: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, options))}")


def _at_least(key: str, value, low) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}")


def _in_unit_interval(key: str, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}={value} must lie in [0, 1]")


def validate(cfg: Config) -> None:
    """Refuse invalid cells and values before anything expensive happens (no model is loaded)."""
    from kltd.objectives.divergences import DIVERGENCES
    from kltd.objectives.estimators import ESTIMATORS
    from kltd.objectives.losses import BASELINES
    from kltd.objectives.rewards import REWARDS, WEIGHTINGS

    _choice("prefix", cfg.prefix.source, PREFIXES)
    _choice("trajectory", cfg.trajectory.supervisor, TRAJECTORIES)
    error = cell_error(cfg.prefix.source, cfg.trajectory.supervisor)
    if error:
        raise ConfigError(error)
    _choice("prefix.other", cfg.prefix.other, ("fixed", "teacher"))
    _in_unit_interval("prefix.student_fraction", cfg.prefix.student_fraction)
    _in_unit_interval("prefix.student_fraction_start", cfg.prefix.student_fraction_start)
    _choice("prefix.schedule", cfg.prefix.schedule, ("constant", "linear"))
    _at_least("prefix.schedule_steps", cfg.prefix.schedule_steps, 1)
    _choice("prefix.handoff_k", cfg.prefix.handoff_k, ("fixed", "uniform", "geometric"))
    _at_least("prefix.handoff_k_value", cfg.prefix.handoff_k_value, 0)
    if not 0.0 < cfg.prefix.handoff_p <= 1.0:
        raise ConfigError(f"prefix.handoff_p={cfg.prefix.handoff_p} must lie in (0, 1]")
    _choice("prefix.supervise", cfg.prefix.supervise, ("all", "after_handoff"))
    if cfg.prefix.source != "mixed" and (cfg.prefix.handoff or cfg.prefix.schedule != "constant"):
        raise ConfigError("prefix.handoff and prefix.schedule apply to prefix=mixed only; add prefix=mixed")

    traj = cfg.trajectory
    _choice("trajectory.reward", traj.reward, REWARDS)
    _choice("trajectory.weighting", traj.weighting, WEIGHTINGS)
    if traj.supervisor != "dataset" and (traj.reward != "none" or traj.weighting != "none"):
        raise ConfigError("trajectory.reward and trajectory.weighting apply to trajectory=dataset only")
    if (traj.weighting == "none") != (traj.reward == "none"):
        raise ConfigError("set trajectory.reward and trajectory.weighting together (a reward needs a weighting)")
    if not 0.0 < traj.keep_fraction <= 1.0:
        raise ConfigError(f"trajectory.keep_fraction={traj.keep_fraction} must lie in (0, 1]")
    if traj.awr_temperature <= 0 or traj.awr_max_weight <= 0:
        raise ConfigError("trajectory.awr_temperature and trajectory.awr_max_weight must be > 0")

    loss = cfg.loss
    if loss.divergence is not None:
        _choice("loss.divergence", loss.divergence, DIVERGENCES)
    _choice("loss.estimator", loss.estimator, ESTIMATORS)
    _choice("loss.normalization", loss.normalization, ("token", "sequence"))
    _choice("loss.baseline", loss.baseline, BASELINES)
    if loss.estimator.startswith("sampled"):
        # a one-token estimator is only unbiased at tokens drawn from the distribution it assumes
        wanted = {"student": "student", "expert": "teacher"}.get(cfg.trajectory.supervisor)
        if cfg.prefix.source != wanted:
            raise ConfigError(f"loss.estimator={loss.estimator} needs tokens sampled by the "
                              f"{'student' if wanted == 'student' else 'teacher'}: use prefix={wanted} "
                              f"with trajectory={cfg.trajectory.supervisor}, or loss.estimator=exact")
    _in_unit_interval("loss.beta", loss.beta)
    _in_unit_interval("loss.alpha", loss.alpha)
    _in_unit_interval("loss.mix", loss.mix)
    _in_unit_interval("loss.gamma", loss.gamma)
    _at_least("loss.kl_trajectory_weight", loss.kl_trajectory_weight, 0.0)
    _at_least("loss.kl_prefix_weight", loss.kl_prefix_weight, 0.0)
    _at_least("loss.top_k", loss.top_k, 1)
    if loss.temperature <= 0:
        raise ConfigError(f"loss.temperature={loss.temperature} must be > 0")
    if loss.kl_prefix_weight > 0 and cfg.prefix.source in ("student", "mixed") and cfg.sampling.temperature == 0:
        raise ConfigError("loss.kl_prefix_weight > 0 needs sampled student states (a score function); "
                          "greedy sampling.temperature=0 has none: set sampling.temperature > 0")
    if loss.kl_trajectory_weight == 0 and loss.kl_prefix_weight == 0:
        raise ConfigError("loss.kl_trajectory_weight and loss.kl_prefix_weight are both 0: nothing would be trained")
    if cfg.trajectory.supervisor == "dataset" and loss.divergence is not None:
        raise ConfigError("loss.divergence has no effect with trajectory=dataset (cross-entropy); remove it")

    _choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    if cfg.data.responses_file is not None:
        if cfg.prefix.source not in ("fixed", "mixed"):
            raise ConfigError("data.responses_file supplies fixed states; use prefix=fixed (or mixed)")
        from pathlib import Path

        if not Path(cfg.data.responses_file).expanduser().is_file():
            raise ConfigError(f"data.responses_file '{cfg.data.responses_file}' does not exist "
                              "(make one with `kltd make-data`)")
    _choice("data.name", cfg.data.name, ("addition",))
    _at_least("data.min_terms", cfg.data.min_terms, 2)
    if cfg.data.max_terms < cfg.data.min_terms:
        raise ConfigError(f"data.max_terms={cfg.data.max_terms} must be >= data.min_terms={cfg.data.min_terms}")
    if cfg.eval.num_prompts > cfg.data.n_eval:
        raise ConfigError(f"eval.num_prompts={cfg.eval.num_prompts} exceeds data.n_eval={cfg.data.n_eval}")

    if cfg.sampling.temperature < 0:
        raise ConfigError(f"sampling.temperature={cfg.sampling.temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < cfg.sampling.top_p <= 1.0:
        raise ConfigError(f"sampling.top_p={cfg.sampling.top_p} must lie in (0, 1]")
    for key, value in (
        ("sampling.max_new_tokens", cfg.sampling.max_new_tokens),
        ("trainer.batch_size", cfg.trainer.batch_size),
        ("trainer.grad_accum", cfg.trainer.grad_accum),
        ("trainer.length_groups", cfg.trainer.length_groups),
        ("trainer.log_every", cfg.trainer.log_every),
        ("eval.num_prompts", cfg.eval.num_prompts),
        ("eval.batch_size", cfg.eval.batch_size),
        ("eval.max_new_tokens", cfg.eval.max_new_tokens),
        ("eval.pass_k", cfg.eval.pass_k),
    ):
        _at_least(key, value, 1)
    _at_least("trainer.num_threads", cfg.trainer.num_threads, 0)
    _at_least("trainer.max_steps", cfg.trainer.max_steps, 0)
    if cfg.trainer.lr <= 0:
        raise ConfigError(f"trainer.lr={cfg.trainer.lr} must be > 0")
    _choice("wandb.mode", cfg.wandb.mode, ("auto", "online", "offline", "disabled"))
    _choice("cache.teacher", cfg.cache.teacher, ("auto", "on", "off"))
    _choice("cache.format", cfg.cache.format, ("full", "topk"))
    _at_least("cache.top_k", cfg.cache.top_k, 1)
    if cfg.cache.teacher == "on" and cfg.prefix.source != "fixed":
        raise ConfigError("cache.teacher=on caches teacher logits at fixed states; it needs prefix=fixed")

    from kltd.train.models import check_model_reference

    for role in ("teacher", "student"):
        problem = check_model_reference(getattr(cfg.model, role))
        if problem:
            raise ConfigError(f"model.{role}: {problem}")


def config_method_label(cfg) -> str:
    """The method label of a config (typed, or an OmegaConf node with the same keys)."""
    p, t, loss = cfg.prefix, cfg.trajectory, cfg.loss
    return method_label(p.source, t.supervisor, reward=t.reward, handoff=p.handoff, divergence=loss.divergence,
                        beta=loss.beta, alpha=loss.alpha, mix=loss.mix, student_fraction=p.student_fraction,
                        kl_prefix_weight=loss.kl_prefix_weight)
