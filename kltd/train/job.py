"""One training job, from a typed config to a finished run directory.

The run directory holds metrics.jsonl (one line per logged step), metrics.json (the summary; status
"completed" only once everything else is written) and checkpoint/. A job leaves no state behind in the
process: its models die with it, and the thread count it set is restored.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kltd.files import atomic_write_dir, atomic_write_json
from kltd.report.logger import RunLogger
from kltd.report.records import SUMMARY_FILE
from kltd.rollout.batch import TokenCounts
from kltd.spec.config import Config
from kltd.spec.matrix import slug
from kltd.train.preflight import preflight

HEADLINE = ("accuracy", "reverse_kl_student_states", "forward_kl_teacher_states", "student_entropy", "response_length")


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


def save_checkpoint(model, tokenizer, run_dir: Path) -> Path:
    """Atomic (kltd.files): a checkpoint/ that exists is complete."""

    def write(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)

    return atomic_write_dir(run_dir / "checkpoint", write)


def train_job(cfg: Config, run_dir: Path, *, sweep: str | None = None, config_dict: dict | None = None,
              console: Console | None = None) -> dict:
    """Check, train, evaluate and record one cell. Returns the summary written to metrics.json."""
    console = console or Console()
    preflight(cfg)  # before any model is loaded
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    identity = run_identity(cfg, sweep)
    config_dict = config_dict or dataclasses.asdict(cfg)
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.exists():
        summary_path.unlink()  # a summary from an earlier attempt would pass this one off as finished
    logger = RunLogger(
        run_dir, wandb_mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity,
        name=f"{identity['method_slug']}-s{cfg.seed}" + (f"-{run_dir.name}" if sweep else ""),
        group=sweep, job_type=identity["method_slug"],
        tags=[f"prefix:{cfg.prefix.source}", f"trajectory:{cfg.trajectory.supervisor}", f"method:{cfg.method}"],
        config={**config_dict, **wandb_axes(identity)}, init_timeout_s=cfg.wandb.init_timeout_s, echo=console.print,
    )
    started = time.perf_counter()
    try:
        summary = _train_and_evaluate(cfg, run_dir, logger, console)
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


def needs_responses(cfg: Config) -> bool:
    """Whether the run's states include the dataset's own responses (so prompt-only data cannot serve)."""
    p = cfg.prefix
    fixed = p.source == "fixed" or (p.source == "mixed" and p.other == "fixed" and p.student_fraction < 1)
    return fixed or (p.source == "mixed" and p.handoff and p.handoff_k == "uniform")


def _train_and_evaluate(cfg: Config, run_dir: Path, logger: RunLogger, console: Console) -> dict:
    from kltd.data.prepare import prepare, rendered_example
    from kltd.train.models import check_tokenizers, load_pair
    from kltd.train.threads import job_threads, threads_for
    from kltd.train.trainer import seed_everything

    seed_everything(cfg.seed)
    m = cfg.model
    # tokenizer and data before any weights: a bad row or a tokenizer mismatch costs seconds, not a model load
    tokenizer = check_tokenizers(m.teacher, m.student)
    data = prepare(cfg.data, tokenizer, needs_responses=needs_responses(cfg))
    (run_dir / "first_example.txt").write_text(rendered_example(data.train[0], data.end_token))
    if data.held_out is not None:
        atomic_write_json(run_dir / "data_split.json", {"held_out_rows": data.held_out, **data.summary})
    s = data.summary
    console.print(f"data: {s['where']} ({s['format']}): {s['train_examples']} training and {s['eval_examples']} "
                  f"held-out examples, checker {s['checker']}"
                  + (f"; {s['dropped']} rows dropped" if s["dropped"] else "")
                  + (f"; {s['truncated']} truncated" if s["truncated"] else "")
                  + (" (data.max_prompt_tokens / data.max_response_tokens)" if s["dropped"] or s["truncated"] else ""),
                  highlight=False)
    pair = load_pair(m.teacher, m.student, m.dtype, m.device, tokenizer=tokenizer, teacher_device=m.teacher_device,
                     gradient_checkpointing=cfg.trainer.gradient_checkpointing)
    with job_threads(threads_for(cfg.trainer.num_threads, pair.device, (pair.teacher, pair.student))):
        summary = _run(cfg, pair, data.train, data.eval, data.checker, run_dir, logger, console)
    return {**summary, "data": data.summary}


def _run(cfg: Config, pair, train_examples: list, eval_examples: list, checker, run_dir: Path, logger: RunLogger,
         console: Console) -> dict:
    from kltd.train.evaluation import evaluate
    from kltd.train.trainer import Trainer

    e = cfg.eval

    def run_eval(step: int) -> dict:
        result = evaluate(pair.student, pair.teacher, pair.tokenizer, eval_examples[: e.num_prompts], e,
                          checker=checker, lean=cfg.sampling.lean_decoder, vocab=pair.vocab_size)
        logger.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, step=step)
        return result

    console.print(f"[bold]{cfg.method}[/] (prefix={cfg.prefix.source}, trajectory={cfg.trajectory.supervisor}) "
                  f"on {pair.device}")
    console.print(f"run directory: {run_dir}", soft_wrap=True, highlight=False)
    before = run_eval(0) if e.before else None
    trainer = Trainer(cfg, pair, train_examples, checker=checker)
    if trainer.uses_teacher_cache():
        from kltd.train.models import resolve_model_path
        from kltd.train.teacher_cache import cached_teacher

        def count(n: int) -> None:
            trainer.teacher_forwards += n

        trainer.attach_teacher_cache(cached_teacher(
            pair.teacher, pair.tokenizer, resolve_model_path(cfg.model.teacher), resolve_model_path(cfg.model.student),
            train_examples, cache_dir=Path(cfg.cache.dir), dtype=cfg.model.dtype, fmt=cfg.cache.format,
            top_k=cfg.cache.top_k, needed=trainer.planned_examples(), counter=count, echo=console.print))
    tokens, trained_tokens, loss = TokenCounts(), 0, float("nan")
    t = cfg.trainer
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    train_started = time.perf_counter()
    with Progress(*columns, console=console, disable=not t.progress, transient=False) as progress:
        bar = progress.add_task(cfg.method, total=t.max_steps, status="")
        for step in range(1, t.max_steps + 1):
            stats = trainer.step()
            tokens.add(stats.tokens)
            trained_tokens += stats.trained_tokens
            loss = stats.loss
            elapsed = time.perf_counter() - train_started
            progress.update(bar, advance=1, status=f"loss {loss:.4f}  {trained_tokens / elapsed:,.0f} tok/s")
            if step % t.log_every == 0 or step == t.max_steps:
                logger.log({"train/loss": loss, **{f"train/{k}": v for k, v in stats.parts.items()},
                            "train/tokens_per_s": trained_tokens / elapsed,
                            "cost/student_tokens_generated": tokens.student_generated,
                            "cost/teacher_tokens_generated": tokens.teacher_generated,
                            "cost/tokens_scored": tokens.scored, "cost/wall_time_s": elapsed}, step=step)
            if e.every and step % e.every == 0 and step != t.max_steps:
                run_eval(step)
    train_time = time.perf_counter() - train_started
    after = run_eval(t.max_steps)
    console.print(before_after_table(cfg.method, before or {}, after))
    checkpoint = save_checkpoint(pair.student, pair.tokenizer, run_dir) if t.save_checkpoint else None
    return {
        "steps": t.max_steps,
        "train_time_s": train_time,
        "steps_per_s": t.max_steps / train_time if train_time > 0 else None,
        "final_loss": loss,
        "tokens": {"student_generated": tokens.student_generated, "teacher_generated": tokens.teacher_generated,
                   "scored": tokens.scored, "trained": trained_tokens},
        "teacher_forward_passes": trainer.teacher_forwards,  # training only (cache building included)
        "eval_before": before,
        "eval_after": after,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
