"""Typed configuration: the schema every config file and override is checked against, each section with
its own checks beside it (the axes and the loss in kltd.schema.axes, the other sections in
kltd.schema.sections, the rules that join sections in kltd.schema.joint); here the whole run's config, what it
implies (the approximations it makes, the method's label) and make-data's config.

Plain dataclasses; the Hydra entry point (kltd.app.train_command) registers them as the schema and turns
the composed config into these objects. `Config.check()` refuses bad values and invalid combinations
before anything expensive happens; it reads no files (kltd.train.preflight checks those). Nothing here
imports Hydra or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from kltd.schema.axes import LossConfig, PrefixConfig, TrajectoryConfig
from kltd.schema.checks import ConfigError, at_least, choice, in_unit_interval
from kltd.schema.joint import check_joint, exact_figures, score_function_term, trajectory_divergence
from kltd.schema.matrix import cell_error, method_label
from kltd.schema.rl import RLConfig
from kltd.schema.sections import (CacheConfig, DataConfig, DataFields, DistributedConfig, EvalConfig,
                                  EvalSetConfig, LoraSettings, MarkovTaskConfig, ModelConfig, SamplingConfig,
                                  TrainerConfig, WandbConfig, horizon_text)

# the sections are imported from here by the rest of kltd: one place to name a config class from
__all__ = ["CacheConfig", "Config", "ConfigError", "DataConfig", "DataFields", "DistributedConfig", "EvalConfig",
           "EvalRunConfig", "EvalSetConfig", "LoraSettings", "LossConfig", "MakeDataConfig", "MarkovTaskConfig",
           "ModelConfig", "PrefixConfig", "SamplingConfig", "TrainerConfig", "TrajectoryConfig", "WandbConfig",
           "approximations", "config_method_label", "exact_figures", "needs_responses", "score_function_term",
           "teacher_cache_used", "validate"]


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
    # every evaluation set eval.sets may name (conf/eval_set/ fills it; +eval_sets.NAME={...} adds one)
    eval_sets: Dict[str, EvalSetConfig] = field(default_factory=lambda: {"heldout": EvalSetConfig()})
    cache: CacheConfig = field(default_factory=CacheConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # rl=grpo: GRPO after the distillation (kltd.train.reinforce)

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
                        self.wandb, self.distributed, self.rl):
            section.check()
        check_joint(self)


@dataclass
class EvalRunConfig(Config):
    """`kltd eval`: a run's config (models, data, sampling, eval.*, eval_sets) plus the model it evaluates."""

    # student | teacher (model.student / model.teacher), a model directory, a hub name, or a run directory
    # (its trained student, checkpoint/)
    target: str = "student"

    def check(self) -> None:
        if not self.target.strip():
            raise ConfigError("target is empty; name student, teacher, a model directory or a run directory")
        if self.model.lora.enabled:
            raise ConfigError("model.lora trains an adapter in kltd train; kltd eval evaluates a model as it is: give "
                              "a LoRA run's merged student (target=RUN_DIR, trained with model.lora.save_merged=true)")
        super().check()


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
    # the training settings a model preset carries besides its pair (conf/model/, e.g. model=markov, which data=markov
    # picks): accepted so that the preset composes here too; make-data reads none of them
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def check(self) -> None:
        if not self.out:
            raise ConfigError("make-data needs out=FILE, the JSONL file to write")
        at_least("n", self.n, 1)
        at_least("batch_size", self.batch_size, 1)
        choice("writer", self.writer, ("student", "teacher"))
        in_unit_interval("other_fraction", self.other_fraction)
        if self.model.lora.enabled:
            raise ConfigError("model.lora trains an adapter in kltd train; make-data samples model.student as it is: "
                              "give a LoRA run's merged student (model.student=RUN_DIR, trained with "
                              "model.lora.save_merged=true)")
        for section in (self.model, self.data, self.sampling):
            section.check()


def needs_responses(cfg) -> bool:
    """Whether the run's states include the dataset's own responses (prefix=fixed, a mixture with fixed states, a
    hand-off drawn over the reference length), so prompt-only data cannot serve."""
    p = cfg.prefix
    fixed = p.source == "fixed" or (p.source == "mixed" and p.other == "fixed" and p.student_fraction < 1)
    return fixed or (p.source == "mixed" and p.handoff and p.handoff_k == "uniform")


def teacher_cache_used(cfg) -> bool:
    """Whether the run reads the teacher's logits from the teacher cache: fixed states whose loss needs the
    teacher (a divergence term, or the teacher_loglik reward), unless cache.teacher=off."""
    traj = cfg.trajectory
    needs = cfg.loss.kl_trajectory_weight > 0 and (traj.supervisor != "dataset" or traj.reward == "teacher_loglik")
    return cfg.prefix.source == "fixed" and cfg.cache.teacher != "off" and needs


# What each one-token estimator gives, by divergence (kltd.objectives.estimators; docs/theory.md §5)
_ONE_TOKEN = {
    ("sampled_k2", "reverse_kl"): "one token's 0.5 (log q - log p)^2: its expected gradient is KL(q||p)'s, its value "
                                  "is not the KL",
    ("sampled_reward", "reverse_kl"): "a one-token policy-gradient estimate of KL(q||p)'s gradient (reward "
                                      "log p - log q)",
    ("sampled_k1", "forward_kl"): "cross-entropy on the teacher's one sampled token, a one-token estimate of "
                                  "KL(p||q) and its gradient",
    ("sampled_k3", "forward_kl"): "one token's (r - 1) - log r, a one-token estimate of KL(p||q) and its gradient",
}


def approximations(cfg: Config) -> list[str]:
    """One short line per approximation an accepted config makes: each place where its gradient is not the
    exact (expected) gradient of the objective its method label names (docs/theory.md §9). [] when there is
    none. The config is assumed to pass Config.check() (what it refuses is not listed); settings a config
    does not use (the estimator of a weight-0 term, a baseline without a score-function term) add nothing.
    """
    loss, traj, sampling, prefix = cfg.loss, cfg.trajectory, cfg.sampling, cfg.prefix
    out = []
    divergence = loss.kl_trajectory_weight > 0 and traj.supervisor != "dataset"
    served = cfg.model.teacher_server is not None  # the served teacher's own k replaces loss.top_k
    if divergence and loss.estimator == "topk" and not served:
        out.append(f"loss.estimator=topk: the divergence over the teacher's top {loss.top_k} tokens and one bucket "
                   "for all the others, not over the whole vocabulary")
    if served and cfg.model.teacher_top_k > 0 and (divergence or score_function_term(cfg)):
        out.append(f"model.teacher_top_k={cfg.model.teacher_top_k}: every divergence over the served teacher's top "
                   f"{cfg.model.teacher_top_k} tokens and one bucket for all the others (both models coarsened to k + 1 "
                   "bins: a lower bound of the full divergence, exact when k covers the vocabulary); so are the "
                   "evaluation's KL figures")
    if divergence and loss.estimator.startswith("sampled"):
        out.append(f"loss.estimator={loss.estimator}: {_ONE_TOKEN[(loss.estimator, trajectory_divergence(cfg))]}")
    if teacher_cache_used(cfg) and cfg.cache.format == "topk" and not served:
        out.append(f"cache.format=topk: the cached teacher keeps its top {cfg.cache.top_k} logits per position and "
                   "spreads the rest of its mass evenly")
    batch = cfg.trainer.batch_size
    if traj.weighting == "awr":
        out.append(f"trajectory.weighting=awr: a row's weight compares its reward with the mean reward of its "
                   f"micro-batch ({batch} rows), not the population's mean: a bias of order 1/{batch}")
    if traj.weighting == "filter":
        out.append(f"trajectory.weighting=filter: keeps the top {traj.keep_fraction:g} of each micro-batch "
                   f"({batch} rows) by reward, not the rows above the population's quantile")
    writers = " and ".join(prefix.sampling_models())
    if writers and sampling.temperature == 0:
        out.append(f"sampling.temperature=0: the states are the {writers}'s greedy responses, not samples of its "
                   "distribution")
    elif writers and sampling.temperature != 1:
        out.append(f"sampling.temperature={sampling.temperature:g}: the states are sampled from the {writers}'s "
                   "distribution sharpened or flattened, not from the distribution itself")
    if writers and sampling.top_p < 1:
        out.append(f"sampling.top_p={sampling.top_p:g}: the states come from the nucleus of the {writers}'s "
                   "distribution, while the loss compares the full distributions")
    if sampling.backend == "vllm" and sampling.vllm_sync_every > 1 and "student" in prefix.sampling_models():
        out.append(f"sampling.vllm_sync_every={sampling.vllm_sync_every}: the student's states come from its "
                   f"weights up to {sampling.vllm_sync_every - 1} optimiser step{'s' * (sampling.vllm_sync_every > 2)} "
                   "old (off-policy states)")
    if score_function_term(cfg):
        if loss.gamma < 1:
            out.append(f"loss.gamma={loss.gamma:g}: the prefix term discounts later divergence, a biased gradient "
                       "of the sequence-level divergence")
        if loss.kl_prefix_weight != loss.kl_trajectory_weight:
            out.append(f"loss.kl_prefix_weight={loss.kl_prefix_weight:g}: differs from loss.kl_trajectory_weight="
                       f"{loss.kl_trajectory_weight:g}; only equal weights give the exact gradient of the "
                       "sequence-level divergence")
    return out + _rl_approximations(cfg.rl)


def _rl_approximations(rl) -> list[str]:
    """The RL stage's: where its expected gradient is not that of the expected reward (docs/theory.md §10)."""
    if not rl.enabled:
        return []
    out = []
    if rl.scale == "std":
        out.append("rl.scale=std: GRPO divides a group's advantages by the group's standard deviation (the sample's "
                   "own reward included), so the expected gradient is not proportional to the expected reward's; "
                   "rl.scale=none with rl.baseline=leave_one_out is exact")
    if rl.kl_weight > 0:
        out.append(f"rl.kl_weight={rl.kl_weight:g}: the k3 penalty's value estimates KL(q||ref), but its expected "
                   "gradient is KL(ref||q)'s at the student's states")
    if rl.epochs > 1:
        out.append(f"rl.epochs={rl.epochs}: the updates after the first reuse their batch (off-policy samples, the "
                   f"ratio clipped to [{1 - rl.clip_low:g}, {1 + rl.clip_high:g}])")
    return out


def validate(cfg: Config) -> None:
    """Refuse invalid cells and values before anything expensive happens (no file read, no model loaded)."""
    cfg.check()


def config_method_label(cfg) -> str:
    """The method label of a config (typed, or an OmegaConf node with the same keys)."""
    p, t, loss = cfg.prefix, cfg.trajectory, cfg.loss
    schedule = getattr(loss, "mix_schedule", "constant")  # an OmegaConf node or a saved config may predate it
    mix = loss.mix if schedule == "constant" else (loss.mix + loss.mix_end) / 2
    return method_label(p.source, t.supervisor, reward=t.reward, handoff=p.handoff, divergence=loss.divergence,
                        beta=loss.beta, alpha=loss.alpha, mix=mix, student_fraction=p.student_fraction,
                        kl_prefix_weight=loss.kl_prefix_weight, estimator=loss.estimator, top_k=loss.top_k,
                        schedule=None if schedule == "constant" else f"{loss.mix:g}→{loss.mix_end:g} {schedule}",
                        horizon=horizon_text(cfg.sampling), rl=getattr(getattr(cfg, "rl", None), "algorithm", "none"),
                        lora=lora_text(getattr(cfg.model, "lora", None)))


def lora_text(lora) -> str | None:
    """'lora(16)', or 'qlora(16)' on a 4-bit base, for a LoRA student; None otherwise (also for a config saved before
    model.lora existed). `lora`: a LoraSettings or an OmegaConf node."""
    r = getattr(lora, "r", 0) or 0
    if r <= 0:
        return None
    return f"{'q' if getattr(lora, 'quantize_base', 'none') == '4bit' else ''}lora({r})"
