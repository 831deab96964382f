"""The execution plan: how one job runs its models, decided once from the config and what the models allow.

Which forward scores each model (kltd's packed forward, or the model's own), which decoder samples (kltd's lean
decoder, the model's own forward, or a vLLM engine), whether the loss is formed from hidden states (the fused
head), whether a batch is split by length, whether the teacher cache serves, how the evaluation runs. The
trainer, the evaluation and the cache fill read the plan; none of them decides. A job prints it in one line
and records it in metrics.json, so a user sees which paths ran.

The choices rest on what a model allows: its architecture (kltd.fast serves the Llama family), sharding (a
model sharded by FSDP runs through its own forward), its output layer (the fused head needs a plain linear
map), its linear layers (a LoRA adapter or a quantised base is not seen by the fast paths, which read plain
weights: such a model runs through its own forward, and the plan says why), and the config's switches
(trainer.packed_forward, trainer.fused_head, sampling.lean_decoder, sampling.backend,
trainer.gradient_checkpointing: checkpointing lives in the model's own forward).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from kltd.fast.arranged import family_supported, is_sharded, plain_projections, supports
from kltd.objectives.fused_head import plain_output_layer
from kltd.schema.config import Config, teacher_cache_used

ROLES = ("student", "teacher")
# A model's logits at its own samples are the ones its sampler drew from: kept, they spare scoring those samples
# with it again in the evaluation. Kept where a sampling call's [rows, max_new_tokens, V] fits in this many
# numbers (512 MiB in float32: the toy pair always, a 32k vocabulary at a few dozen rows).
KEEP_SAMPLED_LOGITS = 2**27


@dataclass(frozen=True)
class Route:
    """How one model runs in one part of a job."""

    packed: bool  # scored by kltd's packed forward (real tokens only), else by the model's own forward
    decoder: str  # what samples from it: "lean" (kltd's decoder), "forward" (the model's own), "vllm"
    lockstep: bool = False  # a sharded model: its processes decode in step (each pass is a collective)

    def text(self) -> str:
        return f"{'packed' if self.packed else 'own forward'}, {self.decoder} decoder" + (", lockstep" if self.lockstep else "")


def route(model, *, packed: bool, lean: bool, backend: str = "kltd") -> Route:
    """The fastest way `model` allows, of those the switches permit."""
    fast = supports(model)  # the Llama family, not sharded
    decoder = "vllm" if backend == "vllm" else "lean" if lean and fast else "forward"
    return Route(packed=packed and fast, decoder=decoder, lockstep=is_sharded(model))


@dataclass(frozen=True)
class EvaluationPlan:
    student: Route
    teacher: Route
    keep_sampled_logits: bool  # a model's logits at its own samples are kept from sampling, not scored again
    may_keep: bool = True  # the fast paths are on: logits are kept wherever a sampling call's fit
    logit_width: int = 0  # the vocabulary the kept logits span

    def at(self, rows: int, max_new_tokens: int) -> EvaluationPlan:
        """This plan for sampling calls of `rows` rows and `max_new_tokens` tokens (an evaluation set's own
        batches and budget): logits are kept only where they fit."""
        keep = self.may_keep and rows * max_new_tokens * self.logit_width <= KEEP_SAMPLED_LOGITS
        return replace(self, keep_sampled_logits=keep)

    def text(self) -> str:
        teacher = "by its server" if self.teacher.decoder == "server" else self.teacher.text()
        return (f"student {self.student.text()}, teacher {teacher}"
                + (", sampled logits kept" if self.keep_sampled_logits else ""))


def evaluation_plan(student, teacher, *, lean: bool, rows: int, max_new_tokens: int, vocab: int | None,
                    vllm: tuple[str, ...] = ()) -> EvaluationPlan:
    """kltd's fast paths where a model allows them (`lean`), else the models' own forward throughout; the roles in
    `vllm` sample through the job's vLLM engine. `rows`: the most rows one sampling call holds (prompts per batch x
    samples per prompt)."""
    routes = {role: route(model, packed=lean, lean=lean, backend="vllm" if role in vllm else "kltd")
              for role, model in (("student", student), ("teacher", teacher))}
    width = vocab or max(model.get_output_embeddings().weight.shape[0] for model in (student, teacher))
    return EvaluationPlan(routes["student"], routes["teacher"], keep_sampled_logits=False, may_keep=lean,
                          logit_width=width).at(rows, max_new_tokens)


@dataclass(frozen=True)
class ExecutionPlan:
    training: dict[str, Route]  # "student", "teacher"
    samplers: tuple[str, ...]  # the models that write training states by sampling
    fused_head: bool  # the exact divergence from hidden states, chunk by chunk (no [B, T, V] logits)
    length_groups: int  # a micro-batch is scored in up to this many groups of rows of similar length (1: whole)
    teacher_cache: bool  # fixed states: the teacher's logits come from the cache
    cache_fill_packed: bool  # the cache is filled through the teacher's packed forward
    evaluation: EvaluationPlan
    reuse_evaluation_before: bool  # the evaluation before training is read from the eval cache when there
    rl: str = "none"  # the RL stage after the distillation (rl.algorithm): it samples the student by its route
    notes: tuple[str, ...] = ()  # why a model the fast paths serve runs otherwise (a LoRA student)

    def line(self) -> str:
        """The plan in one line, as a job prints it."""
        s, t = self.training["student"], self.training["teacher"]
        sampling = ", ".join(f"{role} by the {self.training[role].decoder} decoder" for role in self.samplers)
        teacher = "by its server" if t.decoder == "server" else "packed" if t.packed else "own forward"
        return (f"plan: scoring student {'packed' if s.packed else 'own forward'}, teacher "
                f"{teacher}; loss {'fused head' if self.fused_head else 'from logits'}"
                + (f" in {self.length_groups} length groups" if self.length_groups > 1 else "")
                + (f"; states sampled: {sampling}" if sampling else "")
                + ("; teacher cache" if self.teacher_cache else "")
                + (f"; then {self.rl.upper()}, student sampled by the {s.decoder} decoder" if self.rl != "none" else "")
                + f"; evaluation: {self.evaluation.text()}"
                + "".join(f"; {note}" for note in self.notes))

    def record(self) -> dict:
        """What metrics.json keeps."""
        return asdict(self)


def loss_is_sum_over_rows(cfg: Config) -> bool:
    """True unless a batch-level term couples the rows (the prefix term's baselines, offline-RL weights)."""
    loss, traj = cfg.loss, cfg.trajectory
    return loss.kl_prefix_weight == 0 and (traj.supervisor != "dataset" or traj.reward == "none")


def evaluation_engines(cfg: Config, training: dict[str, Route], evaluation_only: bool) -> tuple[str, ...]:
    """The roles the evaluation samples through vLLM (sampling.backend=vllm): the model training samples with it,
    where the engine holds its current weights at every evaluation (the teacher's never change; the student's are
    pushed after every step only with sampling.vllm_sync_every=1); in `kltd eval`, the evaluated model."""
    if cfg.sampling.backend != "vllm":
        return ()
    if evaluation_only:
        return ("student",)
    return tuple(role for role, r in training.items()
                 if r.decoder == "vllm" and (role == "teacher" or cfg.sampling.vllm_sync_every == 1))


def fallback_notes(cfg: Config, models: dict) -> tuple[str, ...]:
    """Why a Llama-family model runs through its own forward although the fast paths serve its family: its linear
    layers are wrapped (a LoRA adapter, a quantised base), and the fast paths read plain weights."""
    lora = cfg.model.lora
    notes = []
    for role, model in models.items():
        if model is None or not family_supported(model) or plain_projections(model):
            continue
        base = ", base in 4 bits" if lora.quantize_base == "4bit" else ""
        what = f"a LoRA adapter (model.lora.r={lora.r}{base})" if role == "student" and lora.enabled else \
            "wrapped linear layers"
        notes.append(f"{role} by its own forward and decoder: it carries {what}, which kltd's packed forward, lean "
                     "decoder and arranged weights do not see")
    return tuple(notes)


# a teacher served by another process (model.teacher_server): scored and sampled there
SERVED = Route(packed=False, decoder="server")


def served_notes(cfg: Config) -> tuple[str, ...]:
    """What a served teacher changes: the loss from its top-k tokens and tail (the fused head falls back to the loss
    from logits), and the evaluation's teacher figures in the same form (an OpenAI-compatible server's samples are
    not kltd's draws: the figures on teacher samples are left out)."""
    m = cfg.model
    if m.teacher_server is None:
        return ()
    k = f"top {m.teacher_top_k}" if m.teacher_top_k else "whole vocabulary"
    fused = "; the fused head falls back to the loss from logits" if cfg.trainer.fused_head else ""
    bound = " (lower bounds)" if m.teacher_top_k else ""
    if m.teacher_server.rstrip("/").endswith("/v1"):
        figures = (f"the evaluation's reverse KL on the student's samples on the same buckets{bound}; no figures on "
                   "teacher samples (an OpenAI-compatible server's draws are not kltd's)")
    else:
        figures = f"the evaluation's KL figures on the same buckets{bound}, teacher samples drawn by the server"
    return (f"teacher served by {m.teacher_server} ({k} and a tail per position){fused}; {figures}",)


def plan_for(cfg: Config, student, teacher, vocab: int | None = None, evaluation_only: bool = False
             ) -> ExecutionPlan:
    """The plan of a job with this config and these (loaded, possibly sharded) models (`evaluation_only`: a
    `kltd eval` job, whose evaluated model sits in the student's place)."""
    t, s, loss = cfg.trainer, cfg.sampling, cfg.loss
    sampling = cfg.prefix.sampling_models()
    served = cfg.model.teacher_server is not None  # no teacher in this process (teacher is None)
    training = {
        # gradient checkpointing lives in the model's own forward, so a checkpointed student is scored through it
        # the RL stage samples the student whatever the prefix (kltd.train.reinforce)
        "student": route(student, packed=t.packed_forward and not t.gradient_checkpointing, lean=s.lean_decoder,
                         backend=s.backend if "student" in sampling or cfg.rl.enabled else "kltd"),
        "teacher": SERVED if served else route(teacher, packed=t.packed_forward, lean=s.lean_decoder,
                                               backend=s.backend if "teacher" in sampling else "kltd"),
    }
    fused = (t.fused_head and loss.estimator == "exact" and loss.kl_prefix_weight == 0 and not served
             and cfg.trajectory.supervisor != "dataset"
             and all(plain_output_layer(m) is not None and not is_sharded(m) for m in (student, teacher)))
    both_packed = fused and training["student"].packed and training["teacher"].packed
    split = loss_is_sum_over_rows(cfg) and not both_packed and not is_sharded(student)
    e = cfg.eval
    evaluation = evaluation_plan(student, student if served else teacher, lean=s.lean_decoder,
                                 rows=min(e.batch_size, e.num_prompts) * e.n_samples, max_new_tokens=e.max_new_tokens,
                                 vocab=vocab, vllm=evaluation_engines(cfg, training, evaluation_only))
    if served:  # the evaluation asks the server for the teacher (the plan's note says how)
        evaluation = replace(evaluation, teacher=SERVED)
    return ExecutionPlan(training=training, samplers=sampling, fused_head=fused,
                         length_groups=t.length_groups if split else 1, teacher_cache=teacher_cache_used(cfg),
                         cache_fill_packed=t.packed_forward and not served and supports(teacher), evaluation=evaluation,
                         # the processes of a sharded student evaluate together: none may skip one the others make
                         reuse_evaluation_before=cfg.cache.eval_before and not is_sharded(student), rl=cfg.rl.algorithm,
                         notes=fallback_notes(cfg, {"student": student, "teacher": teacher}) + served_notes(cfg))
