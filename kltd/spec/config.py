"""Typed configuration: the schema every config file and override is checked against, each section with
its own checks beside it.

Plain dataclasses; the Hydra entry point (kltd.app.train_command) registers them as the schema and turns
the composed config into these objects. `Config.check()` refuses bad values and invalid combinations
before anything expensive happens; it reads no files (kltd.train.preflight checks those). Nothing here
imports Hydra or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kltd.spec import choices as C
from kltd.spec.matrix import cell_error, direction_error, method_label


class ConfigError(ValueError):
    """A user error in the configuration: reported as one line, no traceback."""


def _choice(key: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, options))}")


def _at_least(key: str, value, low) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}")


def _in_unit_interval(key: str, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}={value} must lie in [0, 1]")


def _positive(key: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")


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
        _choice("prefix", self.source, C.PREFIXES)
        _choice("prefix.other", self.other, C.MIXED_OTHER)
        _in_unit_interval("prefix.student_fraction", self.student_fraction)
        _in_unit_interval("prefix.student_fraction_start", self.student_fraction_start)
        _choice("prefix.schedule", self.schedule, C.SCHEDULES)
        _at_least("prefix.schedule_steps", self.schedule_steps, 1)
        _choice("prefix.handoff_k", self.handoff_k, C.HANDOFF_K)
        _at_least("prefix.handoff_k_value", self.handoff_k_value, 0)
        if not 0.0 < self.handoff_p <= 1.0:
            raise ConfigError(f"prefix.handoff_p={self.handoff_p} must lie in (0, 1]")
        _choice("prefix.supervise", self.supervise, C.SUPERVISE)
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
        _choice("trajectory", self.supervisor, C.TRAJECTORIES)
        _choice("trajectory.reward", self.reward, C.REWARDS)
        _choice("trajectory.weighting", self.weighting, C.WEIGHTINGS)
        if self.supervisor != "dataset" and (self.reward != "none" or self.weighting != "none"):
            raise ConfigError("trajectory.reward and trajectory.weighting apply to trajectory=dataset only")
        if (self.weighting == "none") != (self.reward == "none"):
            raise ConfigError("set trajectory.reward and trajectory.weighting together (a reward needs a weighting)")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ConfigError(f"trajectory.keep_fraction={self.keep_fraction} must lie in (0, 1]")
        _positive("trajectory.awr_temperature", self.awr_temperature)
        _positive("trajectory.awr_max_weight", self.awr_max_weight)


@dataclass
class LossConfig:
    """total = kl_trajectory_weight * L_traj + kl_prefix_weight * L_prefix."""

    kl_trajectory_weight: float = 1.0
    kl_prefix_weight: float = 0.0
    # None: the trajectory's own divergence (expert -> forward_kl, student -> reverse_kl). A blend (jsd,
    # kl_mix, tv, the skews) may replace it; the other KL direction may not (that is the other trajectory).
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

    def check(self) -> None:
        if self.divergence is not None:
            _choice("loss.divergence", self.divergence, C.DIVERGENCES)
        _choice("loss.estimator", self.estimator, C.ESTIMATORS)
        _choice("loss.normalization", self.normalization, C.NORMALIZATIONS)
        _choice("loss.baseline", self.baseline, C.BASELINES)
        for key in ("beta", "alpha", "mix", "gamma"):
            _in_unit_interval(f"loss.{key}", getattr(self, key))
        _at_least("loss.kl_trajectory_weight", self.kl_trajectory_weight, 0.0)
        _at_least("loss.kl_prefix_weight", self.kl_prefix_weight, 0.0)
        _at_least("loss.top_k", self.top_k, 1)
        _positive("loss.temperature", self.temperature)
        if self.kl_trajectory_weight == 0 and self.kl_prefix_weight == 0:
            raise ConfigError("loss.kl_trajectory_weight and loss.kl_prefix_weight are both 0: nothing would be trained")

    @property
    def parameters(self) -> dict:
        return {"beta": self.beta, "alpha": self.alpha, "mix": self.mix}


@dataclass
class ModelConfig:
    # "toy/teacher" and "toy/student" are the pair shipped inside the package; anything else is a local
    # directory or a Hugging Face model id.
    teacher: str = "toy/teacher"
    student: str = "toy/student"
    dtype: str = "float32"  # float32 | bfloat16 | float16 (both models; the loss is always formed in float32)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    teacher_device: Optional[str] = None  # null: the student's device; e.g. cuda:1 to give the teacher its own GPU
    trust_remote_code: bool = False  # run a model repository's own Python code (only for models that need it)

    def check(self) -> None:
        _choice("model.dtype", self.dtype, C.DTYPES)


@dataclass
class DataFields:
    """Column names for rows in neither of TRL's formats (e.g. GSM8K: prompt=question, response=answer)."""

    prompt: Optional[str] = None
    response: Optional[str] = None  # null with a prompt column: prompt-only data (sampled states only)
    answer: Optional[str] = None  # the reference answer for the checker; null: taken from the response


@dataclass
class DataConfig:
    """Where the examples come from: the built-in task, a local file or directory, or a hub dataset."""

    source: str = "addition"  # addition | file | hub
    seed: int = 0  # the built-in task's generator; the held-out fraction's shuffle
    # the built-in task: how many examples; a file or hub dataset: at most this many
    n_train: int = 20000
    n_eval: int = 500
    min_terms: int = 2  # the built-in task's chains
    max_terms: int = 5
    # the built-in task: a JSONL file of responses to train on (`kltd make-data` writes one)
    responses_file: Optional[str] = None
    # file: a JSONL, JSON, Parquet or CSV file, or a save_to_disk directory; hub: a dataset name
    path: Optional[str] = None
    name: Optional[str] = None  # hub: the dataset's configuration
    train_split: str = "train"
    # null: hold out eval_fraction of the training split (seeded by data.seed, recorded in the run)
    eval_split: Optional[str] = None
    eval_fraction: float = 0.1
    fields: DataFields = field(default_factory=DataFields)
    max_prompt_tokens: Optional[int] = None
    max_response_tokens: Optional[int] = None
    overflow: str = "drop"  # rows over a limit: drop them, or truncate (prompt from the left, response from the right)
    system_prompt: Optional[str] = None
    chat_template: str = "auto"  # auto: the student tokenizer's template when it has one | none: plain text
    # how a response is graded (accuracy, pass@k, the correctness reward): auto is the built-in task's own
    # checker for data=addition and none (no accuracy) otherwise
    checker: str = "auto"

    def check(self) -> None:
        _choice("data.source", self.source, C.DATA_SOURCES)
        _choice("data.checker", self.checker, C.CHECKERS)
        _choice("data.overflow", self.overflow, C.OVERFLOW)
        _choice("data.chat_template", self.chat_template, C.CHAT_TEMPLATE)
        _at_least("data.n_train", self.n_train, 1)
        _at_least("data.n_eval", self.n_eval, 1)
        for key in ("max_prompt_tokens", "max_response_tokens"):
            if getattr(self, key) is not None:
                _at_least(f"data.{key}", getattr(self, key), 2)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must lie in (0, 1)")
        if self.source == "addition":
            _at_least("data.min_terms", self.min_terms, 2)
            if self.max_terms < self.min_terms:
                raise ConfigError(f"data.max_terms={self.max_terms} must be >= data.min_terms={self.min_terms}")
            if self.path is not None:
                raise ConfigError("data.path needs data=file or data=hub (the built-in task is generated)")
        else:
            if not self.path:
                example = "data=file data.path=train.jsonl" if self.source == "file" else "data=hub data.path=openai/gsm8k"
                raise ConfigError(f"data={self.source} needs data.path, e.g. {example}")
            if self.responses_file is not None:
                raise ConfigError("data.responses_file applies to the built-in task; with data=file put the "
                                  "responses in the file itself")
        if self.source != "hub" and self.name is not None:
            raise ConfigError("data.name is a hub dataset's configuration; it needs data=hub")

    @property
    def checker_name(self) -> str:
        if self.checker != "auto":
            return self.checker
        return "addition" if self.source == "addition" else "none"


@dataclass
class SamplingConfig:
    """How teacher and student sample states, in training and in evaluation."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    # decode Llama/Qwen2/Qwen3 models with kltd's preallocated-cache decoder (same logits, less overhead);
    # false: always the model's own forward
    lean_decoder: bool = True
    # what draws the training samples (the student's or the teacher's): kltd's own decoder, or a vLLM engine
    # (the vllm extra), given the student's weights every vllm_sync_every optimiser steps; the loss never uses
    # vLLM's numbers
    backend: str = "kltd"
    vllm_sync_every: int = 1
    vllm_memory: float = 0.3  # the share of device memory (RAM on a CPU) the engine may take

    def check(self) -> None:
        _choice("sampling.backend", self.backend, C.SAMPLING_BACKENDS)
        _at_least("sampling.vllm_sync_every", self.vllm_sync_every, 1)
        if not 0.0 < self.vllm_memory < 1.0:
            raise ConfigError(f"sampling.vllm_memory={self.vllm_memory} must lie in (0, 1)")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p={self.top_p} must lie in (0, 1]")
        _at_least("sampling.max_new_tokens", self.max_new_tokens, 1)


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
    # recompute the student's activations in backward instead of keeping them (less memory, ~30% more
    # compute); the student is then scored through its own forward, not the packed one
    gradient_checkpointing: bool = False
    # CPU threads for PyTorch during this job (restored afterwards). 0: one thread when both models are
    # small (the toy pair), where a second thread only adds synchronisation and, on a busy machine, stalls
    # every tiny matmul; else the process's default.
    num_threads: int = 0
    # A process-level setting, applied once by the entry point: keep freed memory in the process for reuse
    # (glibc malloc; kltd.fast.memory). Saves the page faults of re-allocating the same tensors every step;
    # the process holds its peak memory until it exits.
    keep_freed_memory: bool = True
    save_checkpoint: bool = True  # the trained student in Hugging Face format, in checkpoint/
    # a training checkpoint (weights, optimiser, every random state, the data position) every this many
    # steps and at the end, in checkpoints/; a rerun in the same directory resumes from the newest. 0: at
    # the end (and on SIGTERM / SIGINT) only
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # steps whose loss or gradients are not finite that may be skipped (no update) before the run stops
    skip_bad_steps: int = 0
    progress: bool = True

    def check(self) -> None:
        _at_least("trainer.checkpoint_every", self.checkpoint_every, 0)
        _at_least("trainer.keep_checkpoints", self.keep_checkpoints, 1)
        _at_least("trainer.skip_bad_steps", self.skip_bad_steps, 0)
        for key in ("max_steps", "batch_size", "grad_accum", "length_groups", "log_every"):
            _at_least(f"trainer.{key}", getattr(self, key), 1)
        _at_least("trainer.num_threads", self.num_threads, 0)
        _at_least("trainer.warmup_steps", self.warmup_steps, 0)
        _in_unit_interval("trainer.min_lr_ratio", self.min_lr_ratio)
        _positive("trainer.lr", self.lr)
        _positive("trainer.max_grad_norm", self.max_grad_norm)


@dataclass
class EvalConfig:
    num_prompts: int = 200
    batch_size: int = 200  # prompts per sampling call (x pass_k rows); large batches amortise per-token overhead
    max_new_tokens: int = 64
    every: int = 0  # evaluate every N steps as well as before and after; 0 = before and after only
    before: bool = True  # false skips the evaluation before training (identical for every cell of a sweep)
    seed: int = 1234  # fixed, so that every cell is evaluated on identical samples
    pass_k: int = 4  # student samples per prompt for pass@k and the sequence reverse KL

    def check(self) -> None:
        for key in ("num_prompts", "batch_size", "max_new_tokens", "pass_k"):
            _at_least(f"eval.{key}", getattr(self, key), 1)
        _at_least("eval.every", self.every, 0)


@dataclass
class CacheConfig:
    """The teacher cache for fixed states (kltd.train.teacher_cache) and the evaluation before training
    (kltd.train.eval_cache), both kept in `dir` and shared by every run that has the same inputs."""

    teacher: str = "auto"  # auto: on when prefix=fixed needs teacher logits | on | off
    dir: str = "outputs/cache"
    format: str = "full"  # full (exact) | topk (k logits per position, the rest spread evenly)
    top_k: int = 64
    eval_before: bool = True  # reuse the evaluation before training of a run with the same student, data and eval

    def check(self) -> None:
        _choice("cache.teacher", self.teacher, C.CACHE_MODES)
        _choice("cache.format", self.format, C.CACHE_FORMATS)
        _at_least("cache.top_k", self.top_k, 1)


@dataclass
class WandbConfig:
    project: str = "kltd"
    entity: Optional[str] = None
    # auto: online when credentials exist, else offline (one line says so); or online | offline | disabled
    mode: str = "auto"
    init_timeout_s: float = 30.0

    def check(self) -> None:
        _choice("wandb.mode", self.mode, C.WANDB_MODES)
        _positive("wandb.init_timeout_s", self.init_timeout_s)


@dataclass
class DistributedConfig:
    """Data-parallel training: kltd starts nproc_per_node processes for the run (kltd.train.ranks). Each
    trains on trainer.batch_size / nproc_per_node rows of every micro-batch; the result does not depend on
    nproc_per_node."""

    nproc_per_node: int = 1
    strategy: str = "ddp"  # ddp: every process holds the whole student | fsdp: 1/N of it each (FSDP2)
    backend: str = "auto"  # auto: nccl on CUDA, gloo on the CPU

    def check(self) -> None:
        _at_least("distributed.nproc_per_node", self.nproc_per_node, 1)
        _choice("distributed.strategy", self.strategy, C.DISTRIBUTED_STRATEGIES)
        _choice("distributed.backend", self.backend, C.DISTRIBUTED_BACKENDS)
        if self.strategy == "fsdp" and self.nproc_per_node < 2:
            raise ConfigError("distributed.strategy=fsdp shards the student across processes; set "
                              "distributed.nproc_per_node=2 or more (or use distributed.strategy=ddp)")


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
        _at_least("n", self.n, 1)
        _at_least("batch_size", self.batch_size, 1)
        _choice("writer", self.writer, ("student", "teacher"))
        _in_unit_interval("other_fraction", self.other_fraction)
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
