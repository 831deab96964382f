"""The rules that join sections of a run's config (Config.check runs them after each section's own checks): what
data parallelism, an RL stage, a LoRA student, a served teacher, the Markov task, the length schedule, the loss and
its estimators need from the rest of the config. Each refusal is one line that says how to fix it.
"""

from __future__ import annotations

from kltd.schema.checks import ConfigError
from kltd.schema.choices import SAMPLED_ESTIMATORS
from kltd.schema.matrix import direction_error, own_divergence
from kltd.schema.sections import MAX_EXACT_LEAVES, EvalConfig


def processes(cfg) -> str:
    """The settings that make the run's process count, as a user writes them."""
    d = cfg.distributed
    return (f"distributed.nproc_per_node={d.nproc_per_node}" if d.nodes == 1 else
            f"distributed.nnodes={d.nodes} x distributed.nproc_per_node={d.nproc_per_node}")


def exact_figures(cfg) -> bool:
    """Whether the evaluation adds the exact figures (eval.exact_kl; null: on for data=markov while its chain and
    horizon give at most MAX_EXACT_LEAVES sequences per prompt; above that the sampled figures, with their bootstrap
    intervals, are the measure)."""
    on = cfg.eval.exact_kl
    if on is None:
        return cfg.data.source == "markov" and cfg.data.markov.leaves <= MAX_EXACT_LEAVES
    return on


def check_eval_sets(settings: EvalConfig, catalog: dict) -> None:
    """Every set eval.sets names exists in eval_sets and is well formed."""
    for name in settings.sets:
        if name not in catalog:
            raise ConfigError(f"eval.sets names '{name}', which is not an evaluation set; known: "
                              f"{', '.join(sorted(catalog))} (add one with +eval_sets.{name}={{...}} or "
                              "conf/eval_set/)")
        catalog[name].check(f"eval_sets.{name}")


def score_function_term(cfg) -> bool:
    """Whether the loss has the prefix term's score-function part: loss.kl_prefix_weight > 0 and the student
    writes some of the states (prefix=student, or mixed with student rows). On fixed or teacher states alone
    the prefix term is cross-entropy on the prefix tokens instead (kltd.objectives.losses.prefix_loss)."""
    return cfg.loss.kl_prefix_weight > 0 and "student" in cfg.prefix.sampling_models()


def trajectory_divergence(cfg) -> str | None:
    """The per-token divergence of the trajectory term: the blend in its place, else the trajectory's own."""
    return cfg.loss.divergence or own_divergence(cfg.trajectory.supervisor)


def check_joint(cfg) -> None:
    """Every rule that joins sections, in the order a run meets them."""
    _check_data_parallel(cfg)
    _check_loss_against_axes(cfg)
    _check_prefix_term(cfg)
    _check_length_schedule(cfg)
    _check_groups(cfg)
    _check_rl(cfg)
    _check_lora(cfg)
    _check_teacher_server(cfg)
    if cfg.cache.teacher == "on" and cfg.prefix.source != "fixed":
        raise ConfigError("cache.teacher=on caches teacher logits at fixed states; it needs prefix=fixed")
    if cfg.data.responses_file is not None and cfg.prefix.source not in ("fixed", "mixed"):
        raise ConfigError("data.responses_file supplies fixed states; use prefix=fixed (or mixed)")
    check_eval_sets(cfg.eval, cfg.eval_sets)
    _check_markov(cfg)
    heldout = [name for name in cfg.eval.sets if cfg.eval_sets[name].source == "heldout"]
    for name in heldout:
        wanted = cfg.eval_sets[name].num_prompts or cfg.eval.num_prompts
        if wanted > cfg.data.n_eval:
            raise ConfigError(f"eval.num_prompts={wanted} ({name}) exceeds data.n_eval={cfg.data.n_eval}")
    if cfg.sampling.backend == "vllm" and len(cfg.prefix.sampling_models()) > 1:
        raise ConfigError("sampling.backend=vllm runs one engine, and this prefix samples from both the student "
                          "and the teacher; use sampling.backend=kltd")
    if cfg.trajectory.reward == "correctness" and cfg.data.checker_name == "none":
        raise ConfigError("trajectory.reward=correctness grades responses with an answer checker; set "
                          "data.checker (exact, gsm8k or boxed)")


def _check_data_parallel(cfg) -> None:
    """What data parallelism needs of the other sections."""
    n = cfg.distributed.world_size
    if n == 1:
        return
    g = cfg.sampling.samples_per_prompt
    if cfg.trainer.batch_size % (n * g):
        groups = f" x sampling.samples_per_prompt={g}" if g > 1 else ""
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} must be a multiple of "
                          f"{processes(cfg)}{groups} (each process trains on batch_size / {n} rows"
                          + (", whole groups of one prompt's samples)" if g > 1 else ")"))
    if cfg.sampling.backend == "vllm":
        raise ConfigError("sampling.backend=vllm runs one engine in one process; with distributed.nproc_per_node > 1 "
                          "use sampling.backend=kltd")
    if cfg.model.teacher_device is not None:
        raise ConfigError("model.teacher_device places the teacher of a one-process run; with "
                          "distributed.nproc_per_node > 1 each process keeps its teacher on its own device")
    # a sharded student's passes are collectives, and with a mixed prefix a process may have no rows to sample
    if cfg.distributed.strategy == "fsdp" and cfg.prefix.source == "mixed":
        raise ConfigError("distributed.strategy=fsdp with prefix=mixed is not built (processes would sample unequal "
                          "numbers of student rows); use distributed.strategy=ddp")
    # the batch_mean baseline is summed across processes; with a mixed prefix a process may hold no
    # student rows in a micro-batch, and would then miss that collective
    if cfg.loss.kl_prefix_weight > 0 and cfg.loss.baseline == "batch_mean" and cfg.prefix.source == "mixed":
        raise ConfigError("loss.baseline=batch_mean with prefix=mixed couples rows that data parallelism splits "
                          "unevenly; use loss.baseline=none, or distributed.nproc_per_node=1")


def _check_groups(cfg) -> None:
    """Several samples of one prompt: from a prefix that samples, in whole groups per micro-batch."""
    n, rows = cfg.sampling.samples_per_prompt, cfg.trainer.batch_size
    if n == 1:
        return
    if not cfg.prefix.sampling_models():
        raise ConfigError(f"sampling.samples_per_prompt={n} draws several states of each prompt, and "
                          f"prefix={cfg.prefix.source} samples none (they would be {n} copies of one dataset row); "
                          "use prefix=student, teacher or mixed, or sampling.samples_per_prompt=1")
    if rows % n:
        raise ConfigError(f"trainer.batch_size={rows} is not a whole number of groups of sampling.samples_per_prompt"
                          f"={n} (trainer.batch_size counts samples); use a multiple of {n}")


def _check_rl(cfg) -> None:
    """What the RL stage needs of the other sections: a reward, sampled responses from the current student, whole
    groups in each process."""
    rl, s, n = cfg.rl, cfg.sampling, cfg.distributed.world_size
    if not rl.enabled:
        if cfg.trainer.max_steps == 0:
            raise ConfigError("trainer.max_steps=0 trains nothing; it is for an RL stage alone (rl=grpo), from "
                              "model.student")
        return
    if rl.reward == "checker" and cfg.data.checker_name == "none":
        raise ConfigError(f"rl.reward=checker needs an answer checker, and data.checker={cfg.data.checker} gives none "
                          "for this data; set data.checker=gsm8k, boxed or exact, or rl.reward=module:function")
    if (rl.temperature if rl.temperature is not None else s.temperature) <= 0:
        raise ConfigError("the RL stage samples at sampling.temperature=0 (greedy): a group's samples would be one "
                          "response; set rl.temperature > 0 (or sampling.temperature)")
    if rl.batch_size % (rl.group_size * n):
        raise ConfigError(f"rl.batch_size={rl.batch_size} must be a multiple of rl.group_size={rl.group_size} x "
                          f"{processes(cfg)}: each process takes whole groups")
    if cfg.distributed.strategy == "fsdp":
        raise ConfigError("rl=grpo with distributed.strategy=fsdp is not built; use distributed.strategy=ddp")
    if s.backend == "vllm" and s.vllm_sync_every > 1:
        raise ConfigError(f"rl=grpo samples the current student; sampling.vllm_sync_every={s.vllm_sync_every} would "
                          "sample older weights: use sampling.vllm_sync_every=1")
    if s.backend == "vllm" and "teacher" in cfg.prefix.sampling_models():
        raise ConfigError("sampling.backend=vllm runs one engine, and the teacher's would be needed for the "
                          "distillation's states while the RL stage samples the student; use prefix=student or "
                          "fixed with rl=grpo, or sampling.backend=kltd")


def _check_teacher_server(cfg) -> None:
    """What a served teacher (model.teacher_server) gives: its top-k tokens and tail per position, and samples; not
    the full distribution a one-token estimator or a token's log-likelihood needs."""
    if cfg.model.teacher_server is None:
        return
    loss, traj = cfg.loss, cfg.trajectory
    if loss.kl_trajectory_weight > 0 and traj.supervisor != "dataset" and loss.estimator.startswith("sampled"):
        raise ConfigError(f"loss.estimator={loss.estimator} needs the teacher's probability of any token, and "
                          "model.teacher_server gives its top-k tokens and tail; use loss.estimator=exact or topk")
    if traj.reward == "teacher_loglik":
        raise ConfigError("trajectory.reward=teacher_loglik needs the teacher's probability of every response token, "
                          "and model.teacher_server gives its top-k tokens and tail; use trajectory.reward=none or "
                          "correctness, or load the teacher (drop model.teacher_server)")
    if cfg.model.teacher_server.rstrip("/").endswith("/v1") and cfg.prefix.source in ("teacher", "mixed"):
        raise ConfigError(f"prefix={cfg.prefix.source} samples the teacher, and kltd does not sample through an "
                          "OpenAI-compatible model.teacher_server (its random stream is not kltd's); use prefix=student "
                          "or fixed, or serve the teacher with kltd serve-teacher MODEL")
    if cfg.rl.enabled and cfg.rl.teacher_weight > 0:
        raise ConfigError("rl.teacher_weight > 0 with model.teacher_server is not built; use rl.teacher_weight=0 or "
                          "load the teacher (drop model.teacher_server)")


def _check_lora(cfg) -> None:
    """What a LoRA student (model.lora.r > 0) is not built for yet."""
    lora = cfg.model.lora
    if not lora.enabled:
        return
    if cfg.distributed.strategy == "fsdp":
        raise ConfigError("model.lora.r > 0 with distributed.strategy=fsdp is not built (the adapter is small: "
                          "use distributed.strategy=ddp)")
    if lora.quantize_base == "4bit" and lora.save_merged:
        raise ConfigError("model.lora.save_merged=true with model.lora.quantize_base=4bit is not built (the base "
                          "would be dequantised first); keep the adapter (adapter/) and merge it into the "
                          "full-precision student yourself, or use model.lora.quantize_base=none")
    if lora.quantize_base == "4bit" and cfg.sampling.backend == "vllm":
        raise ConfigError("model.lora.quantize_base=4bit with sampling.backend=vllm is not built (the engine is "
                          "given merged full-precision weights); use model.lora.quantize_base=none or "
                          "sampling.backend=kltd")


def _check_markov(cfg) -> None:
    """data=markov's evaluation measures responses of the task's horizon, and the exact figures enumerate them."""
    d, e = cfg.data, cfg.eval
    if e.exact_kl and d.source != "markov":
        raise ConfigError(f"eval.exact_kl=true enumerates every response, which only data=markov's small vocabulary "
                          f"and horizon allow; with data={d.source} drop it")
    if d.source != "markov":
        return
    horizon = d.markov.horizon
    if exact_figures(cfg) and d.markov.leaves > MAX_EXACT_LEAVES:
        raise ConfigError(f"eval.exact_kl=true with data.markov.n_states={d.markov.n_states} and data.markov.horizon="
                          f"{horizon} scores {d.markov.leaves} sequences per prompt, above {MAX_EXACT_LEAVES}; lower "
                          "the horizon or the number of states, or drop eval.exact_kl=true (the sampled figures are "
                          "then the measure)")
    for name in e.sets:
        spec = cfg.eval_sets[name]
        budget = spec.max_new_tokens or e.max_new_tokens
        if spec.source == "heldout" and budget != horizon:
            key = f"eval_sets.{name}.max_new_tokens" if spec.max_new_tokens else "eval.max_new_tokens"
            raise ConfigError(f"{key}={budget} differs from data.markov.horizon={horizon}: data=markov (the default "
                              f"task) grades and measures responses of the task's horizon; set {key}={horizon} "
                              "(model=markov does), or name the task of the pair you chose (data=addition with "
                              "model=toy; data=gsm8k, data=file or data=hub with a pretrained pair)")


def _check_length_schedule(cfg) -> None:
    """A scheduled horizon needs sampled states, and the gate needs evaluations during training to read."""
    s, schedule, steps = cfg.sampling, cfg.sampling.length_schedule, cfg.trainer.max_steps
    if schedule == "fixed":
        return
    if not cfg.prefix.sampling_models():
        raise ConfigError(f"sampling.length_schedule={schedule} sets the horizon of sampled states, and "
                          f"prefix={cfg.prefix.source} samples none; use prefix=student, teacher or mixed")
    if schedule == "steps" and s.length_steps[-1] > steps:
        raise ConfigError(f"sampling.length_steps={list(s.length_steps)} reaches past trainer.max_steps={steps}: "
                          "a length that starts there is never used")
    if schedule == "entropy_gated" and not 0 < cfg.eval.every < steps:
        raise ConfigError("sampling.length_schedule=entropy_gated decides at each evaluation during training; set "
                          f"eval.every between 1 and trainer.max_steps - 1 (e.g. eval.every={max(1, steps // 4)})")


# One-token estimators of the reverse KL whose value estimates KL(q||p) but whose expected gradient is not its
# gradient (kltd.objectives.estimators; tests/objectives/test_enumerable.py): as a loss, the run would train
# something other than what its name says
_WRONG_GRADIENT = {
    ("sampled_k1", "reverse_kl"): "its expected gradient is zero (log q - log p at the student's own token only adds "
                                  "noise); use loss.estimator=sampled_k2 or sampled_reward (the reverse KL's gradient)",
    ("sampled_k3", "reverse_kl"): "its expected gradient is the forward KL(p||q)'s, DAgger's loss at the same states "
                                  "under OPD's name; use loss.estimator=sampled_k2 or sampled_reward, or "
                                  "trajectory=expert for the forward KL",
}


def _check_loss_against_axes(cfg) -> None:
    loss, supervisor, states = cfg.loss, cfg.trajectory.supervisor, cfg.prefix.source
    if supervisor == "dataset" and loss.divergence is not None:
        raise ConfigError("loss.divergence has no effect with trajectory=dataset (cross-entropy); remove it")
    if supervisor == "dataset" and loss.estimator != "exact":
        raise ConfigError(f"loss.estimator={loss.estimator} has no effect with trajectory=dataset (cross-entropy on "
                          "the dataset's token); remove it (loss.estimator=exact)")
    error = direction_error(supervisor, loss.divergence, **loss.parameters)
    if error:
        raise ConfigError(error)
    if loss.estimator.startswith("sampled"):
        name = trajectory_divergence(cfg)
        defined = SAMPLED_ESTIMATORS.get(name, ())
        if loss.estimator not in defined:  # a blend has no one-token form; k2 and reward need y ~ q
            fix = f"loss.estimator={', '.join(defined)} or exact" if defined else "loss.estimator=exact or topk"
            raise ConfigError(f"loss.estimator={loss.estimator} is not a one-token estimator of {name} "
                              f"(trajectory={supervisor}); use {fix}")
        wrong = _WRONG_GRADIENT.get((loss.estimator, name))
        if wrong:
            raise ConfigError(f"loss.estimator={loss.estimator} under trajectory={supervisor}: {wrong}")
        # a one-token estimator is only unbiased at tokens drawn from the very distribution it assumes
        wanted = {"student": "student", "expert": "teacher"}[supervisor]
        if states != wanted:
            raise ConfigError(f"loss.estimator={loss.estimator} needs tokens sampled by the {wanted}: use "
                              f"prefix={wanted} with trajectory={supervisor}, or loss.estimator=exact")
        if cfg.sampling.top_p < 1 or cfg.sampling.temperature != loss.temperature:
            raise ConfigError(f"loss.estimator={loss.estimator} assumes tokens drawn from the full softmax at "
                              f"loss.temperature={loss.temperature:g}; the sampler uses sampling.top_p="
                              f"{cfg.sampling.top_p:g}, sampling.temperature={cfg.sampling.temperature:g}. "
                              "Use sampling.top_p=1 and equal temperatures, or loss.estimator=exact")


# The trajectory estimators whose expected gradient is the exact per-token divergence's: only with one of
# them does adding the score-function term give the exact gradient of the sequence-level divergence
# (tests/objectives/test_enumerable.py: topk, sampled_k1 and sampled_k3 plus the prefix term are off by 0.46-0.79)
_PREFIX_TERM_ESTIMATORS = ("exact", "sampled_k2", "sampled_reward")


def _check_prefix_term(cfg) -> None:
    """What the score-function term needs to be the exact gradient (docs/theory.md §3): the student's current,
    sampled states, per-sequence normalisation, an estimator with the exact expected gradient, and a
    baseline that kltd can form. On fixed or teacher states the prefix term is cross-entropy on the prefix
    tokens, a legitimate objective with either normalisation and any estimator: none of this applies there."""
    loss, sampling = cfg.loss, cfg.sampling
    scored = score_function_term(cfg)
    sampled = loss.estimator.startswith("sampled") and loss.kl_trajectory_weight > 0
    stale = sampling.backend == "vllm" and sampling.vllm_sync_every > 1 and "student" in cfg.prefix.sampling_models()
    if stale and (scored or sampled):
        n = sampling.vllm_sync_every
        users = ["the prefix term's score function"] * scored + [f"loss.estimator={loss.estimator}"] * sampled
        fixes = ["loss.kl_prefix_weight=0"] * scored + ["loss.estimator=exact"] * sampled
        raise ConfigError(f"sampling.vllm_sync_every={n} samples the student's states from weights up to {n - 1} "
                          f"optimiser step{'s' * (n > 2)} old, but {' and '.join(users)} "
                          f"assume{'s' * (len(users) == 1)} samples of the current student; "
                          f"use sampling.vllm_sync_every=1, or {' and '.join(fixes)}")
    if not scored:
        return
    if sampling.temperature == 0:
        raise ConfigError("loss.kl_prefix_weight > 0 needs sampled student states (a score function); "
                          "greedy sampling.temperature=0 has none: set sampling.temperature > 0")
    if loss.normalization != "sequence":
        raise ConfigError("loss.kl_prefix_weight > 0 on student-written states needs loss.normalization=sequence: "
                          f"with loss.normalization={loss.normalization} each sample's gradient is divided by its "
                          "batch's token count, and the trajectory and prefix terms no longer add up to the gradient "
                          "of the sequence-level divergence; set loss.normalization=sequence")
    if loss.kl_trajectory_weight > 0 and loss.estimator not in _PREFIX_TERM_ESTIMATORS:
        defined = SAMPLED_ESTIMATORS.get(trajectory_divergence(cfg), ())
        fine = [e for e in _PREFIX_TERM_ESTIMATORS if e == "exact" or e in defined]
        raise ConfigError(f"loss.estimator={loss.estimator} with loss.kl_prefix_weight > 0 on student-written states: "
                          "its expected gradient is not the exact per-token divergence's, so adding the prefix term "
                          f"gives the gradient of no objective; use loss.estimator={' or '.join(fine)}, or "
                          "loss.kl_prefix_weight=0")
    # with one sample per prompt a leave-one-out group holds one row: its baseline is 0, bit for bit baseline=none
    if loss.baseline == "leave_one_out" and sampling.samples_per_prompt < 2:
        raise ConfigError("loss.baseline=leave_one_out averages the other samples of the same prompt; draw several "
                          "with sampling.samples_per_prompt=4 (any n >= 2), or use loss.baseline=batch_mean or none")
    # a mixed prefix's coin picks the source row by row: a group would mix student and teacher rows
    if loss.baseline == "leave_one_out" and cfg.prefix.source != "student":
        raise ConfigError(f"loss.baseline=leave_one_out needs every sample of a group written by the student; with "
                          f"prefix={cfg.prefix.source} use loss.baseline=batch_mean or none, or prefix=student")
