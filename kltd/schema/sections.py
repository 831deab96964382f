"""The run's other config sections: models, data, sampling, the trainer, evaluation, caches, logging and
processes, each with the checks of its own values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from kltd.schema import choices as C
from kltd.schema.checks import ConfigError, at_least, choice, in_unit_interval, positive


# Llama, Qwen2 and Qwen3 name their attention and MLP projections so: an adapter on every linear map of a block
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """A LoRA adapter on the student (peft, the lora extra): only the adapter trains; r=0 trains the whole model."""

    r: int = 0  # the adapter's rank; 0: no adapter
    alpha: float = 16.0  # the update is (alpha / r) B A
    dropout: float = 0.0  # on the adapter's input, in training
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))  # module names peft wraps
    # none | 4bit: the frozen base loaded in 4 bits (QLoRA; a CUDA GPU and bitsandbytes)
    quantize_base: str = "none"
    save_merged: bool = False  # also write the merged model (base + adapter) to checkpoint/, for transformers

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def check(self) -> None:
        at_least("model.lora.r", self.r, 0)
        choice("model.lora.quantize_base", self.quantize_base, C.QUANTIZE_BASE)
        if not self.enabled:
            for key, off in (("quantize_base", "none"), ("save_merged", False)):
                if getattr(self, key) != off:
                    raise ConfigError(f"model.lora.{key}={getattr(self, key)} belongs to a LoRA student; set "
                                      "model.lora.r (e.g. model.lora.r=16) or drop it")
            return
        positive("model.lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout={self.dropout} must lie in [0, 1)")
        if not self.target_modules or not all(str(name).strip() for name in self.target_modules):
            raise ConfigError(f"model.lora.target_modules={list(self.target_modules)} names no module; e.g. "
                              "model.lora.target_modules=[q_proj,v_proj]")


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
    lora: LoraSettings = field(default_factory=LoraSettings)  # model.lora.r > 0: train a LoRA adapter only
    # a teacher served by `kltd serve-teacher` (http://HOST:PORT): the run loads none and asks it for its top
    # teacher_top_k tokens and the tail's mass per position (0: the whole vocabulary, the exact loss)
    teacher_server: Optional[str] = None
    teacher_top_k: int = 0

    def check(self) -> None:
        choice("model.dtype", self.dtype, C.DTYPES)
        self.lora.check()
        at_least("model.teacher_top_k", self.teacher_top_k, 0)
        if self.teacher_top_k and self.teacher_server is None:
            raise ConfigError(f"model.teacher_top_k={self.teacher_top_k} sets what a served teacher sends, and "
                              "model.teacher_server is not set; for the loaded teacher's top k use "
                              f"loss.estimator=topk loss.top_k={self.teacher_top_k}")
        if self.teacher_server is not None:
            url = self.teacher_server.strip()
            if not url.startswith(("http://", "https://")) or len(url.split("//", 1)[1].strip("/")) == 0:
                raise ConfigError(f"model.teacher_server={self.teacher_server!r} is not a URL; give the address "
                                  "`kltd serve-teacher` printed, e.g. model.teacher_server=http://127.0.0.1:8765")
            if "/v1" in url and not url.rstrip("/").endswith("/v1"):
                raise ConfigError(f"model.teacher_server={url}: give an OpenAI-compatible server's base URL, ending in "
                                  "/v1 (e.g. http://127.0.0.1:8000/v1), not one of its endpoints")
            if self.teacher_device is not None:
                raise ConfigError("model.teacher_device places a teacher this process loads; with "
                                  "model.teacher_server the server holds it: drop model.teacher_device")
        for role in ("teacher", "student"):
            if not getattr(self, role).strip():
                raise ConfigError(f"model.{role} is empty: name a local directory or a Hugging Face model, "
                                  f"e.g. model.{role}=path/to/{role}")


@dataclass
class DataFields:
    """Column names for rows in neither of TRL's formats (e.g. GSM8K: prompt=question, response=answer)."""

    prompt: Optional[str] = None
    response: Optional[str] = None  # null with a prompt column: prompt-only data (sampled states only)
    answer: Optional[str] = None  # the reference answer for the checker; null: taken from the response


# The most sequences the exact evaluation may score per prompt (kltd.rollout.exact_kl): (states + 1)^(horizon - 1).
# The shipped chain (6 states, horizon 7) has 117,649, about 2 s per prompt on one CPU thread.
MAX_EXACT_LEAVES = 1 << 17
# a state is one letter of the Markov tokenizer (kltd.data.markov.LETTERS)
MAX_MARKOV_STATES = 52


@dataclass
class MarkovTaskConfig:
    """The chain of data=markov (kltd.data.markov.MarkovSettings): its states, branching, ends and horizon. Every key
    but `horizon` defines the chain the teacher encodes, so with a shipped teacher they must be its own."""

    n_states: int = 6
    branching: int = 3  # next tokens allowed after each state (<eos> among them for a final state)
    final_states: int = 3  # states after which <eos> is allowed; prompts start at the others (none: at any)
    end_probability: float = 0.7  # P(<eos>) after a final state
    concentration: float = 1.0  # Dirichlet parameter of each state's next-state probabilities
    horizon: int = 7  # the most response tokens, <eos> included: the task's (and the evaluation's) budget
    seed: int = 1  # the chain's own seed (data.seed draws the walks)

    def check(self) -> None:
        if not 1 <= self.n_states <= MAX_MARKOV_STATES:
            raise ConfigError(f"data.markov.n_states={self.n_states} must lie in [1, {MAX_MARKOV_STATES}] (one letter "
                              "per state)")
        if not 2 <= self.branching <= self.n_states:
            raise ConfigError(f"data.markov.branching={self.branching} must lie in [2, data.markov.n_states="
                              f"{self.n_states}] (a final state needs <eos> and a successor)")
        if not 1 <= self.final_states <= self.n_states:
            raise ConfigError(f"data.markov.final_states={self.final_states} must lie in [1, data.markov.n_states="
                              f"{self.n_states}] (some state must end)")
        if not 0.0 < self.end_probability < 1.0:
            raise ConfigError(f"data.markov.end_probability={self.end_probability} must lie strictly between 0 and 1")
        positive("data.markov.concentration", self.concentration)
        at_least("data.markov.horizon", self.horizon, 1)

    @property
    def leaves(self) -> int:
        """Sequences the exact evaluation scores per prompt (kltd.rollout.exact_kl.leaf_count)."""
        return (self.n_states + 1) ** (self.horizon - 1)

    def chain_settings(self) -> dict:
        """The keys that define the chain (not the horizon), as kltd/assets/markov/task.json records them."""
        return {k: getattr(self, k) for k in ("n_states", "branching", "final_states", "end_probability",
                                               "concentration", "seed")}


@dataclass
class DataConfig:
    """Where the examples come from: the built-in task, a local file or directory, or a hub dataset."""

    source: str = "addition"  # addition | markov | file | hub
    seed: int = 0  # the built-in task's generator; the held-out fraction's shuffle
    # the built-in task: how many examples; a file or hub dataset: at most this many
    n_train: int = 20000
    n_eval: int = 500
    min_terms: int = 2  # the built-in task's chains
    max_terms: int = 5
    markov: MarkovTaskConfig = field(default_factory=MarkovTaskConfig)  # data=markov's chain
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
    # passed to the chat template in training, evaluation and make-data alike, e.g. {enable_thinking: false} (Qwen3)
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    # how a response is graded (accuracy, pass@k, the correctness reward): auto is the built-in task's own
    # checker for data=addition and data=markov, none (no accuracy) otherwise
    checker: str = "auto"
    # a bad row of a file or hub dataset (it does not fit its format, its prompt or response is empty, the checker
    # cannot read its answer): error names the first and stops | drop leaves them out, counted by reason
    bad_rows: str = "error"

    def check(self) -> None:
        choice("data.source", self.source, C.DATA_SOURCES)
        choice("data.checker", self.checker, C.CHECKERS)
        choice("data.bad_rows", self.bad_rows, C.BAD_ROWS)
        choice("data.overflow", self.overflow, C.OVERFLOW)
        choice("data.chat_template", self.chat_template, C.CHAT_TEMPLATE)
        at_least("data.n_train", self.n_train, 1)
        at_least("data.n_eval", self.n_eval, 1)
        for key in ("max_prompt_tokens", "max_response_tokens"):
            if getattr(self, key) is not None:
                at_least(f"data.{key}", getattr(self, key), 2)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must lie in (0, 1)")
        if self.checker == "markov" and self.source != "markov":
            raise ConfigError("data.checker=markov grades walks of the built-in chain; it needs data=markov")
        if self.source == "markov":
            self.markov.check()
        if self.source in ("addition", "markov") and self.path is not None:
            raise ConfigError(f"data.path needs data=file or data=hub (data={self.source} is generated)")
        if self.source == "markov" and self.responses_file is not None:
            raise ConfigError("data.responses_file applies to data=addition; data=markov's responses are walks of "
                              "its chain")
        if self.source == "addition":
            at_least("data.min_terms", self.min_terms, 2)
            if self.max_terms < self.min_terms:
                raise ConfigError(f"data.max_terms={self.max_terms} must be >= data.min_terms={self.min_terms}")
        elif self.source != "markov":
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
        return self.source if self.source in ("addition", "markov") else "none"


# the keys each sampling.length_schedule reads, and an example of each
_SCHEDULE_KEYS = {"steps": ("lengths", "length_steps"), "entropy_gated": ("lengths", "entropy_min")}
_SCHEDULE_EXAMPLES = {"lengths": "sampling.lengths=[32,64,128]",
                      "length_steps": "sampling.length_steps=[100,200] (the step each later length starts at)",
                      "entropy_min": "sampling.entropy_min=0.3 (nats per token)"}


@dataclass
class SamplingConfig:
    """How teacher and student sample states, in training and in evaluation."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    # decode Llama/Qwen2/Qwen3 models with kltd's own KV-cache decoder (same logits, less overhead);
    # false: always the model's own forward
    lean_decoder: bool = True
    # what draws the training samples (the student's or the teacher's): kltd's own decoder, or a vLLM engine
    # (the vllm extra), given the student's weights every vllm_sync_every optimiser steps; the loss never uses
    # vLLM's numbers
    backend: str = "kltd"
    vllm_sync_every: int = 1
    vllm_memory: float = 0.3  # the share of device memory (RAM on a CPU) the engine may take
    # the training horizon (kltd.rollout.horizon): fixed (max_new_tokens throughout) | steps (lengths[i] from
    # optimiser step length_steps[i - 1] on) | entropy_gated (the paper's curriculum: start at lengths[0], and at
    # each evaluation move to the next length only if the held-out per-token entropy is >= entropy_min)
    length_schedule: str = "fixed"
    lengths: Optional[List[int]] = None  # the horizons of a schedule, in order (max_new_tokens is then unused)
    length_steps: Optional[List[int]] = None  # steps: the step each length after the first starts at
    entropy_min: Optional[float] = None  # entropy_gated: H_min, nats per token
    # samples of each prompt, side by side in one micro-batch and one process (loss.baseline=leave_one_out's groups);
    # trainer.batch_size counts samples, so a micro-batch holds batch_size / samples_per_prompt prompts
    samples_per_prompt: int = 1

    def check(self) -> None:
        choice("sampling.backend", self.backend, C.SAMPLING_BACKENDS)
        self._check_length_schedule()
        at_least("sampling.vllm_sync_every", self.vllm_sync_every, 1)
        at_least("sampling.samples_per_prompt", self.samples_per_prompt, 1)
        if not 0.0 < self.vllm_memory < 1.0:
            raise ConfigError(f"sampling.vllm_memory={self.vllm_memory} must lie in (0, 1)")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p={self.top_p} must lie in (0, 1]")
        at_least("sampling.max_new_tokens", self.max_new_tokens, 1)

    def _check_length_schedule(self) -> None:
        schedule = self.length_schedule
        choice("sampling.length_schedule", schedule, C.LENGTH_SCHEDULES)
        for key, example in _SCHEDULE_EXAMPLES.items():
            users = [s for s, keys in _SCHEDULE_KEYS.items() if key in keys]
            if getattr(self, key) is not None and schedule not in users:
                raise ConfigError(f"sampling.{key} belongs to sampling.length_schedule={' or '.join(users)}, not "
                                  f"{schedule}; drop sampling.{key} or choose that schedule")
            if getattr(self, key) is None and schedule in users:
                raise ConfigError(f"sampling.length_schedule={schedule} needs sampling.{key}, e.g. {example}")
        if schedule == "fixed":
            return
        lengths = list(self.lengths)
        if len(lengths) < 2 or min(lengths) < 1:
            raise ConfigError(f"sampling.lengths={lengths}: a schedule needs at least two horizons, each >= 1 token")
        if schedule == "entropy_gated":
            if any(b <= a for a, b in zip(lengths, lengths[1:])):
                raise ConfigError(f"sampling.lengths={lengths} must grow (L_1 < L_2 < ...): the gate only lengthens")
            at_least("sampling.entropy_min", self.entropy_min, 0.0)
            return
        steps = list(self.length_steps)
        if len(steps) != len(lengths) - 1:
            raise ConfigError(f"sampling.length_steps={steps} needs one step per length after the first "
                              f"({len(lengths) - 1} for sampling.lengths={lengths})")
        if min(steps) < 2 or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ConfigError(f"sampling.length_steps={steps} must be increasing steps >= 2 (step 1 uses the first "
                              "length)")

def horizon_text(sampling) -> str | None:
    """'32→128 gated at H≥0.3' or '32@1,64@50' for a scheduled horizon, None for a fixed one: what sets it apart in
    the method label. `sampling`: a SamplingConfig or an OmegaConf node (a saved config may predate schedules)."""
    schedule = getattr(sampling, "length_schedule", "fixed")
    if schedule == "fixed":
        return None
    lengths = list(sampling.lengths)
    if schedule == "entropy_gated":
        return f"{lengths[0]}→{lengths[-1]} gated at H≥{sampling.entropy_min:g}"
    return ",".join(f"{n}@{s}" for n, s in zip(lengths, [1, *sampling.length_steps]))


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
    # a progress bar on a terminal; elsewhere (a log file, SLURM, CI) a plain line every log_every steps or every
    # progress_every_s seconds, whichever comes first, and during an evaluation or the teacher-cache fill a line
    # every progress_every_s seconds. false: neither
    progress: bool = True
    progress_every_s: float = 30.0

    def check(self) -> None:
        at_least("trainer.checkpoint_every", self.checkpoint_every, 0)
        at_least("trainer.keep_checkpoints", self.keep_checkpoints, 1)
        at_least("trainer.skip_bad_steps", self.skip_bad_steps, 0)
        at_least("trainer.max_steps", self.max_steps, 0)  # 0: an RL stage alone (kltd.schema.config checks)
        for key in ("batch_size", "grad_accum", "length_groups", "log_every"):
            at_least(f"trainer.{key}", getattr(self, key), 1)
        at_least("trainer.num_threads", self.num_threads, 0)
        at_least("trainer.warmup_steps", self.warmup_steps, 0)
        in_unit_interval("trainer.min_lr_ratio", self.min_lr_ratio)
        positive("trainer.lr", self.lr)
        positive("trainer.max_grad_norm", self.max_grad_norm)
        positive("trainer.progress_every_s", self.progress_every_s)


@dataclass
class EvalConfig:
    # the evaluation sets, by name in eval_sets (conf/eval_set/): heldout is the training data's held-out split
    sets: List[str] = field(default_factory=lambda: ["heldout"])
    num_prompts: int = 200  # questions per set (a set's own num_prompts wins; a set with fewer has them all)
    batch_size: int = 200  # questions per sampling call (x samples rows); large batches amortise per-token overhead
    # at most this many tokens (prompt + budget, every row) in one sampling call: long budgets get smaller batches
    max_batch_tokens: int = 131072
    max_new_tokens: int = 64  # the token budget of a response (a set's own max_new_tokens wins)
    every: int = 0  # evaluate every N steps as well as before and after; 0 = before and after only
    before: bool = True  # false skips the evaluation before training (identical for every cell of a sweep)
    seed: int = 1234  # fixed, so that every cell is evaluated on identical samples
    pass_k: int = 4  # k of pass@k
    samples: Optional[int] = None  # student samples per question (Avg@k over them; null: pass_k), >= pass_k
    greedy: bool = True  # also a greedy answer per question (accuracy)
    kl: bool = True  # the teacher's columns: sequence KLs on student and teacher samples (needs a teacher)
    # the exact figures of data=markov (kltd.rollout.exact_kl: sequence KLs, entropy rates, length and acceptance by
    # scoring every response, no sampling noise); null: on for data=markov, off otherwise
    exact_kl: Optional[bool] = None
    intervals: int = 1000  # bootstrap resamples over questions for each figure's 95% interval; 0: none

    @property
    def n_samples(self) -> int:
        return self.samples if self.samples is not None else self.pass_k

    def check(self) -> None:
        for key in ("num_prompts", "batch_size", "max_new_tokens", "pass_k", "max_batch_tokens"):
            at_least(f"eval.{key}", getattr(self, key), 1)
        at_least("eval.every", self.every, 0)
        at_least("eval.intervals", self.intervals, 0)
        if self.samples is not None and self.samples < self.pass_k:
            raise ConfigError(f"eval.samples={self.samples} is below eval.pass_k={self.pass_k}: pass@k needs at least "
                              "k samples per question")
        if not self.sets:
            raise ConfigError("eval.sets is empty; name at least one set, e.g. eval.sets=[heldout]")
        if len(set(self.sets)) < len(self.sets):
            raise ConfigError(f"eval.sets={list(self.sets)} names a set twice")


@dataclass
class EvalSetConfig:
    """One evaluation set (conf/eval_set/): where its questions come from, how they are read and graded."""

    source: str = "heldout"  # heldout (the training data's held-out split) | hub | file
    path: Optional[str] = None  # hub: the dataset's name; file: a JSONL/JSON/Parquet/CSV file or save_to_disk dir
    name: Optional[str] = None  # hub: the dataset's configuration
    split: str = "test"
    fields: DataFields = field(default_factory=DataFields)
    checker: str = "auto"  # auto: heldout uses data.checker; others name theirs (exact | gsm8k | boxed | none)
    instruction: Optional[str] = None  # appended to each question, e.g. where to put the final answer
    max_new_tokens: Optional[int] = None  # the set's token budget; null: eval.max_new_tokens
    num_prompts: Optional[int] = None  # null: eval.num_prompts

    def check(self, key: str) -> None:
        choice(f"{key}.source", self.source, C.EVAL_SET_SOURCES)
        choice(f"{key}.checker", self.checker, C.CHECKERS)
        for limit in ("max_new_tokens", "num_prompts"):
            if getattr(self, limit) is not None:
                at_least(f"{key}.{limit}", getattr(self, limit), 1)
        if self.source != "heldout":
            if not self.path:
                raise ConfigError(f"{key} has source={self.source} and no path; set {key}.path")
            if not self.fields.prompt:
                raise ConfigError(f"{key} names no question column; set {key}.fields.prompt")
            if self.checker == "auto":
                raise ConfigError(f"{key}.checker=auto means data.checker for the held-out split only; name one "
                                  "(exact, gsm8k, boxed or none)")


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
        choice("cache.teacher", self.teacher, C.CACHE_MODES)
        choice("cache.format", self.format, C.CACHE_FORMATS)
        at_least("cache.top_k", self.top_k, 1)


@dataclass
class WandbConfig:
    project: str = "kltd"
    entity: Optional[str] = None
    # auto: online when credentials exist, else offline (one line says so); or online | offline | disabled
    mode: str = "auto"
    init_timeout_s: float = 30.0

    def check(self) -> None:
        choice("wandb.mode", self.mode, C.WANDB_MODES)
        positive("wandb.init_timeout_s", self.init_timeout_s)


@dataclass
class DistributedConfig:
    """Data-parallel training: kltd starts nproc_per_node processes for the run on each of nnodes machines
    (kltd.train.ranks). Each trains on trainer.batch_size / (nnodes x nproc_per_node) rows of every micro-batch;
    the result does not depend on the number of processes. nnodes, node_rank and rdzv_endpoint left unset are
    read from SLURM's variables where a job step sets them (kltd.train.nodes), else one machine."""

    nproc_per_node: int = 1
    strategy: str = "ddp"  # ddp: every process holds the whole student | fsdp: 1/N of it each (FSDP2)
    backend: str = "auto"  # auto: nccl on CUDA, gloo on the CPU
    nnodes: Optional[int] = None  # machines in the run, each running the same command (unset: 1, or SLURM's)
    node_rank: Optional[int] = None  # this machine's place, 0 to nnodes - 1; node 0 writes the run directory
    rdzv_endpoint: Optional[str] = None  # HOST:PORT of node 0, where the nodes meet (the same on every node)

    @property
    def nodes(self) -> int:
        return self.nnodes or 1

    @property
    def world_size(self) -> int:
        """Processes in the run, all nodes together."""
        return self.nodes * self.nproc_per_node

    def check(self) -> None:
        at_least("distributed.nproc_per_node", self.nproc_per_node, 1)
        choice("distributed.strategy", self.strategy, C.DISTRIBUTED_STRATEGIES)
        choice("distributed.backend", self.backend, C.DISTRIBUTED_BACKENDS)
        self._check_nodes()
        if self.strategy == "fsdp" and self.world_size < 2:
            raise ConfigError("distributed.strategy=fsdp shards the student across processes; set "
                              "distributed.nproc_per_node=2 or more (or use distributed.strategy=ddp)")

    def _check_nodes(self) -> None:
        if self.nnodes is not None:
            at_least("distributed.nnodes", self.nnodes, 1)
        if self.nodes == 1:
            if self.node_rank not in (None, 0):
                raise ConfigError(f"distributed.node_rank={self.node_rank} is for a run on several machines; set "
                                  "distributed.nnodes to their number, or drop distributed.node_rank")
            return
        if self.node_rank is None:
            raise ConfigError(f"distributed.nnodes={self.nnodes} needs this machine's place: add "
                              f"distributed.node_rank=R (0 on the machine at the endpoint, up to {self.nnodes - 1})")
        if not 0 <= self.node_rank < self.nodes:
            raise ConfigError(f"distributed.node_rank={self.node_rank} is outside 0..{self.nodes - 1} "
                              f"(distributed.nnodes={self.nnodes}); give each machine its own rank in that range")
        if not self.rdzv_endpoint:
            raise ConfigError(f"distributed.nnodes={self.nnodes} needs distributed.rdzv_endpoint=HOST:PORT, node 0's "
                              "address and a free port there, the same on every node (under SLURM kltd reads it "
                              "from the job)")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"distributed.rdzv_endpoint={self.rdzv_endpoint!r} is not HOST:PORT; give node 0's "
                              "address and a free port, e.g. distributed.rdzv_endpoint=node01:29500")
