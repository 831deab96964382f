"""One training job, from a typed config to a finished run directory.

The run directory holds metrics.jsonl (one line per logged step), metrics.json (the summary; status
"completed" only once everything else is written, "interrupted" or "failed" otherwise), checkpoints/ (the
training state, for exact resume: kltd.train.checkpoint) and checkpoint/ (the trained student). The job
holds the directory exclusively while it runs, resumes it when it holds an unfinished run, and leaves no
state behind in the process: its models die with it, and the thread count it set is restored.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kltd.files import atomic_write_dir, atomic_write_json, exclusive_claim
from kltd.report.logger import QuietLogger, RunLogger
from kltd.report.redact import redact
from kltd.report.records import SUMMARY_FILE
from kltd.rollout.batch import TokenCounts
from kltd.spec.config import Config, ConfigError
from kltd.spec.matrix import slug
from kltd.train import checkpoint
from kltd.train.interrupt import Interrupted, stop_requests
from kltd.train.phases import Phases
from kltd.train.preflight import preflight
from kltd.train.ranks import SINGLE, Ranks
from kltd.train.sharding import save_weights, sharded, whole_weights

HEADLINE = ("accuracy", "reverse_kl_student_states", "forward_kl_teacher_states", "student_entropy", "response_length")


def plain_lines(console: Console):
    """Print a message as one unwrapped, unstyled line (paths and warnings stay whole, greppable)."""
    return lambda line: console.print(line, soft_wrap=True, highlight=False, markup=False)


def run_identity(cfg: Config, sweep: str | None) -> dict:
    return {
        "method": cfg.method,
        "method_slug": slug(cfg.method),
        "prefix": cfg.prefix.source,
        "trajectory": cfg.trajectory.supervisor,
        "seed": cfg.seed,
        "sweep": sweep,
    }


def wandb_axes(identity: dict) -> dict:
    """Both axis choices as top-level config fields, so the W&B UI can group runs by them."""
    return {"method": identity["method"], "axis_prefix": identity["prefix"], "axis_trajectory": identity["trajectory"],
            "sweep": identity["sweep"]}


def before_after_table(method: str, before: dict, after: dict) -> Table:
    table = Table(title=f"{method}: held-out evaluation")
    for column in ("metric", "before", "after", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key in HEADLINE:
        if key in before:
            table.add_row(key, f"{before[key]:.4g}", f"{after[key]:.4g}", f"{after[key] - before[key]:+.4g}")
        else:
            table.add_row(key, "-", f"{after[key]:.4g}", "-")
    return table


def save_checkpoint(model, tokenizer, run_dir: Path, weights: dict | None = None) -> Path:
    """Atomic (kltd.files): a checkpoint/ that exists is complete. `weights`: the whole weights of a sharded
    model (kltd.train.sharding.whole_weights)."""

    def write(directory: Path) -> None:
        if weights is None:
            model.save_pretrained(directory, safe_serialization=True)
        else:  # save_pretrained reads the (sharded) parameters themselves: the same files, written here
            directory.mkdir(parents=True)
            model.config.save_pretrained(directory)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(directory)
            save_weights(weights, directory / "model.safetensors")
        tokenizer.save_pretrained(directory)

    return atomic_write_dir(run_dir / "checkpoint", write)


# Keys that may change when a run resumes: where and how it reports, not what it computes.
# distributed.*: the result does not depend on the number of processes, so a run may resume on another count.
RESUMABLE_CHANGES = ("wandb.", "trainer.progress", "trainer.checkpoint_every", "trainer.keep_checkpoints",
                     "trainer.save_checkpoint", "cache.dir", "cache.eval_before", "eval.every", "distributed.")


class AlreadyFinished(Exception):
    """The run directory holds a completed run: nothing to do."""


def _flat(config: dict, parent: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{parent}{key}."))
        else:
            out[f"{parent}{key}"] = value
    return out


def check_resumable(saved: dict, current: dict, where: Path) -> None:
    """Refuse a resume whose config would change the result (one line naming the keys)."""
    a, b = _flat(saved), _flat(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        shown = ", ".join(f"{k}={b.get(k)!r} (was {a.get(k)!r})" for k in changed[:4])
        raise ConfigError(f"{where} holds an unfinished run made with another config: {shown}"
                          f"{' ...' if len(changed) > 4 else ''}; rerun with its settings, or give another "
                          "hydra.run.dir to start afresh")


def train_job(cfg: Config, run_dir: Path, *, sweep: str | None = None, config_dict: dict | None = None,
              console: Console | None = None, worker_setup=None) -> dict:
    """Check, train, evaluate and record one cell. Returns the summary written to metrics.json.

    A directory that holds an unfinished run's checkpoint is resumed (same config, or changes in
    RESUMABLE_CHANGES only); one that holds a finished run raises AlreadyFinished. With
    distributed.nproc_per_node > 1 the training runs in that many processes (kltd.train.data_parallel),
    each calling `worker_setup()` first (the entry point's process settings).
    """
    console = console or Console()
    preflight(cfg)  # before any model is loaded
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_claim(run_dir):  # never two live runs in one directory
        if cfg.distributed.nproc_per_node > 1:
            from kltd.train.data_parallel import run_data_parallel

            return run_data_parallel(claimed_job, cfg, run_dir, sweep, config_dict, console, worker_setup)
        return claimed_job(cfg, run_dir, sweep, config_dict, console)


def claimed_job(cfg: Config, run_dir: Path, sweep: str | None, config_dict: dict | None, console: Console,
                ranks: Ranks = SINGLE) -> dict | None:
    """train_job in a directory this process (or its launcher) holds; process 0 of a data-parallel run
    writes the directory and returns the summary, the others return None."""
    identity = run_identity(cfg, sweep)
    config_dict = redact(config_dict or dataclasses.asdict(cfg))  # what is saved and sent to W&B
    summary_path = run_dir / SUMMARY_FILE
    previous = read_summary(summary_path)
    if previous.get("status") == "completed":
        raise AlreadyFinished(f"{run_dir} holds a finished run ({previous.get('method')}); give another "
                              "hydra.run.dir to train again")
    say = plain_lines(console)
    resume = checkpoint.latest(run_dir, echo=say)
    if resume is not None:
        check_resumable(resume.config, config_dict, run_dir)
        say(f"resuming {run_dir} from step {resume.progress.step} ({resume.path.name})")
    ranks.barrier()  # every process has read the directory before process 0 writes to it
    if not ranks.main:
        _train_and_evaluate(cfg, run_dir, QuietLogger(), console, resume, config_dict, ranks)
        return None
    if summary_path.exists():
        summary_path.unlink()  # a summary from an earlier attempt would pass this one off as finished
    logger = RunLogger(
        run_dir, wandb_mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity,
        name=f"{identity['method_slug']}-s{cfg.seed}" + (f"-{run_dir.name}" if sweep else ""),
        group=sweep, job_type=identity["method_slug"],
        tags=[f"prefix:{cfg.prefix.source}", f"trajectory:{cfg.trajectory.supervisor}", f"method:{cfg.method}"],
        config={**config_dict, **wandb_axes(identity)}, init_timeout_s=cfg.wandb.init_timeout_s, echo=say,
        resume_step=resume.progress.step if resume else None,
    )
    started = time.perf_counter()
    try:
        summary = _train_and_evaluate(cfg, run_dir, logger, console, resume, config_dict, ranks)
    except Interrupted as stop:
        atomic_write_json(summary_path, {**identity, "status": "interrupted", "step": stop.step,
                                         "checkpoint": str(stop.checkpoint), "signal": stop.signum,
                                         "wall_time_s": time.perf_counter() - started, "config": config_dict})
        logger.finish(exit_code=stop.exit_code)
        raise
    except BaseException as error:
        atomic_write_json(summary_path, {**identity, "status": "failed", "error": f"{type(error).__name__}: {error}",
                                         "wall_time_s": time.perf_counter() - started, "config": config_dict})
        logger.finish(exit_code=1)
        raise
    summary = {**identity, "status": "completed", "wall_time_s": time.perf_counter() - started, **summary,
               "config": config_dict}
    logger.summary({f"final/{k}": v for k, v in summary["eval_after"].items()})
    logger.finish()
    atomic_write_json(summary_path, summary)
    return summary


def read_summary(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def needs_responses(cfg: Config) -> bool:
    """Whether the run's states include the dataset's own responses (so prompt-only data cannot serve)."""
    p = cfg.prefix
    fixed = p.source == "fixed" or (p.source == "mixed" and p.other == "fixed" and p.student_fraction < 1)
    return fixed or (p.source == "mixed" and p.handoff and p.handoff_k == "uniform")


def _train_and_evaluate(cfg: Config, run_dir: Path, logger: RunLogger, console: Console,
                        resume: checkpoint.Checkpoint | None, config_dict: dict, ranks: Ranks) -> dict:
    from kltd.data.prepare import prepare
    from kltd.train.models import check_tokenizers, load_pair
    from kltd.train.sharding import shard
    from kltd.train.threads import job_threads, threads_for
    from kltd.train.trainer import seed_everything

    seed_everything(cfg.seed)
    m = cfg.model
    phases = Phases()
    # tokenizer and data before any weights: a bad row or a tokenizer mismatch costs seconds, not a model load
    with phases("data"):
        tokenizer = check_tokenizers(m.teacher, m.student, trust_remote_code=m.trust_remote_code)
        data = prepare(cfg.data, tokenizer, needs_responses=needs_responses(cfg))
    if ranks.main:
        _record_data(run_dir, data, console)
    with phases("loading"):
        pair = load_pair(m.teacher, m.student, m.dtype, m.device, tokenizer=tokenizer, teacher_device=m.teacher_device,
                         gradient_checkpointing=cfg.trainer.gradient_checkpointing,
                         trust_remote_code=m.trust_remote_code)
        if cfg.distributed.strategy == "fsdp":
            shard(pair.student)  # before the optimiser is built on its parameters
    with job_threads(threads_for(cfg.trainer.num_threads, pair.device, (pair.teacher, pair.student))):
        summary = _run(cfg, pair, data, run_dir, logger, console, resume, config_dict, ranks, phases)
    return {**summary, "data": data.summary, "phases": phases.seconds}


def _record_data(run_dir: Path, data, console: Console) -> None:
    """The first training example as the models see it, the held-out split, and one line about the data."""
    from kltd.data.prepare import rendered_example

    (run_dir / "first_example.txt").write_text(rendered_example(data.train[0], data.end_token))
    if data.held_out is not None:
        atomic_write_json(run_dir / "data_split.json", {"held_out_rows": data.held_out, **data.summary})
    s = data.summary
    plain_lines(console)(f"data: {s['where']} ({s['format']}): {s['train_examples']} training and {s['eval_examples']} "
                  f"held-out examples, checker {s['checker']}"
                  + (f"; {s['dropped']} rows dropped" if s["dropped"] else "")
                  + (f"; {s['truncated']} truncated" if s["truncated"] else "")
                  + (" (data.max_prompt_tokens / data.max_response_tokens)" if s["dropped"] or s["truncated"] else ""))


def _run(cfg: Config, pair, data, run_dir: Path, logger: RunLogger, console: Console,
         resume: checkpoint.Checkpoint | None, config_dict: dict, ranks: Ranks, phases: Phases) -> dict:
    from kltd.train.eval_cache import cached_evaluation, evaluation_inputs
    from kltd.train.evaluation import evaluate
    from kltd.train.trainer import Trainer

    e = cfg.eval
    # the processes of a sharded student evaluate together: none may skip an evaluation the others make
    reuse_before = cfg.cache.eval_before and not sharded(pair.student)

    def run_eval(step: int) -> dict | None:
        # the others go on to the next step and wait there; a sharded student's forward needs them all
        if not ranks.main and not sharded(pair.student):
            return None

        def compute() -> dict:
            return evaluate(pair.student, pair.teacher, pair.tokenizer, data.eval[: e.num_prompts], e,
                            checker=data.checker, lean=cfg.sampling.lean_decoder, vocab=pair.vocab_size)

        with phases("evaluation"):
            before = step == 0 and reuse_before  # identical for every cell and seed that starts from this student
            result = (cached_evaluation(evaluation_inputs(cfg, data, pair.device), compute, Path(cfg.cache.dir),
                                        plain_lines(console)) if before else compute())
        logger.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, step=step)
        return result

    console.print(f"[bold]{cfg.method}[/] (prefix={cfg.prefix.source}, trajectory={cfg.trajectory.supervisor}) "
                  f"on {pair.device}")
    plain_lines(console)(f"run directory: {run_dir}")
    trainer = Trainer(cfg, pair, data.train, checker=data.checker, ranks=ranks)
    try:
        return _train(cfg, trainer, pair, data, run_dir, logger, console, resume, config_dict, ranks, run_eval, phases)
    finally:
        trainer.close()  # a vLLM engine dies with its job


def _train(cfg: Config, trainer, pair, data, run_dir: Path, logger: RunLogger, console: Console,
           resume: checkpoint.Checkpoint | None, config_dict: dict, ranks: Ranks, run_eval, phases: Phases) -> dict:
    """Resume or start, train, evaluate after, and return the run's figures."""
    e, t = cfg.eval, cfg.trainer
    if resume is not None:
        resume.restore(trainer)
        progress = resume.progress
    else:
        progress = checkpoint.Progress(eval_before=run_eval(0) if e.before else None)
    ranks.broadcast_parameters(trainer.student)
    if trainer.uses_teacher_cache() and not ranks.main:
        ranks.barrier()  # process 0 fills the cache; the others then read it
    if trainer.uses_teacher_cache():
        from kltd.train.models import resolve_model_path
        from kltd.train.teacher_cache import cached_teacher

        def count(n: int) -> None:
            trainer.teacher_forwards += n

        with phases("cache"):
            trainer.attach_teacher_cache(cached_teacher(
                pair.teacher, pair.tokenizer, resolve_model_path(cfg.model.teacher),
                resolve_model_path(cfg.model.student), data.train, cache_dir=Path(cfg.cache.dir), dtype=cfg.model.dtype,
                fmt=cfg.cache.format, top_k=cfg.cache.top_k, needed=trainer.planned_examples(), counter=count,
                echo=plain_lines(console), packed=cfg.trainer.packed_forward))
        if ranks.main:
            ranks.barrier()
    tokens = TokenCounts(**progress.tokens)
    resumed_from = progress.step if resume is not None else None

    def save() -> Path:
        progress.tokens = dataclasses.asdict(tokens)
        # process 0 saves; the others take part only in gathering a sharded student's weights and state
        state = checkpoint.snapshot(trainer) if ranks.main or sharded(trainer.student) else None
        if not ranks.main:
            return checkpoint.path_for(run_dir, progress.step)
        return checkpoint.save(run_dir, state, progress, config_dict, t.keep_checkpoints)

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    session_started, time_before = time.perf_counter(), progress.train_time_s
    with stop_requests() as stop, Progress(*columns, console=console, disable=not (t.progress and ranks.main),
                                           transient=False) as bar_view:
        bar = bar_view.add_task(cfg.method, total=t.max_steps, completed=progress.step, status="")
        for step in range(progress.step + 1, t.max_steps + 1):
            stats = trainer.step()
            tokens.add(stats.tokens)
            progress.step, progress.loss = step, stats.loss
            progress.trained_tokens += stats.trained_tokens
            progress.train_time_s = time_before + time.perf_counter() - session_started
            elapsed = progress.train_time_s
            bar_view.update(bar, advance=1, status=f"loss {stats.loss:.4f}  "
                                                   f"{progress.trained_tokens / elapsed:,.0f} tok/s")
            if step % t.log_every == 0 or step == t.max_steps:
                logger.log({"train/loss": stats.loss, **{f"train/{k}": v for k, v in stats.parts.items()},
                            "train/tokens_per_s": progress.trained_tokens / elapsed,
                            "cost/student_tokens_generated": tokens.student_generated,
                            "cost/teacher_tokens_generated": tokens.teacher_generated,
                            "cost/tokens_scored": tokens.scored, "cost/wall_time_s": elapsed}, step=step)
            if e.every and step % e.every == 0 and step != t.max_steps:
                run_eval(step)
            if ranks.any(stop.signum is not None):  # every process stops after the same step
                raise Interrupted(stop.signum or signal.SIGTERM, step, save())
            if step == t.max_steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
                save()
    teacher_forwards = int(ranks.sum([trainer.teacher_forwards])[0])
    after = run_eval(t.max_steps)
    weights = whole_weights(pair.student) if t.save_checkpoint and sharded(pair.student) else None
    if not ranks.main:
        return {}
    before = progress.eval_before
    console.print(before_after_table(cfg.method, before or {}, after))
    with phases("checkpoint"):
        final = save_checkpoint(pair.student, pair.tokenizer, run_dir, weights) if t.save_checkpoint else None
    train_time = progress.train_time_s
    phases.add("training", train_time - time_before)  # this session's share (a resumed run trained before too)
    return {
        "steps": t.max_steps,
        "train_time_s": train_time,
        "steps_per_s": t.max_steps / train_time if train_time > 0 else None,
        "final_loss": progress.loss,
        "tokens": {**dataclasses.asdict(tokens), "trained": progress.trained_tokens},
        "teacher_forward_passes": teacher_forwards,  # training only (cache building included), all processes
        "skipped_steps": trainer.skipped_steps,
        "resumed_from_step": resumed_from,
        "eval_before": before,
        "eval_after": after,
        "checkpoint": str(final) if final else None,
    }
