"""One `kltd eval` job: a model evaluated on the evaluation sets in a results directory of its own.

The stages are a training job's (kltd.train.stages.Job: prepare, load, evaluate) with the evaluated model in the
student's place, so the sampler, the checkers, the metrics and the eval cache are the same as in training. The
directory's metrics.json has `kind: eval`, the label of what was evaluated and `eval_after`; kltd compare reads
it beside training runs, so the teacher and the untrained student are rows of the same table.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console

from kltd import hub
from kltd.files import atomic_write_json, exclusive_claim
from kltd.report.logger import RunLogger
from kltd.report.progress import RunProgress
from kltd.report.records import SUMMARY_FILE
from kltd.report.redact import redact
from kltd.schema.config import ConfigError, EvalRunConfig
from kltd.train.evaluation import final_figures
from kltd.train.job import read_summary
from kltd.train.output import Output, evaluation_table, plain_lines
from kltd.train.preflight import preflight
from kltd.train.stages import Job


@dataclasses.dataclass(frozen=True)
class Target:
    model: str  # what loads: a directory or a hub name
    label: str  # its row in kltd compare
    slug: str  # its part of the results directory's name
    teacher_columns: bool  # KLs against model.teacher make sense (not for the teacher itself)


def resolve_target(cfg: EvalRunConfig) -> Target:
    """The model `target` names; a run directory stands for its trained student (checkpoint/)."""
    m, target = cfg.model, cfg.target
    if target in ("student", "teacher"):
        path = getattr(m, target)
        return Target(path, f"{target} ({path})", target, target == "student")
    where = Path(target).expanduser()
    summary = where / SUMMARY_FILE
    if summary.is_file() and not (where / "config.json").is_file():  # a run directory, not a model directory
        trained = where / "checkpoint"
        if not trained.is_dir():
            raise ConfigError(f"target={target} is a run directory without a trained student (checkpoint/): "
                              "the run did not finish, or ran with trainer.save_checkpoint=false")
        method = read_summary(summary).get("method") or "run"
        return Target(str(trained), f"{method} ({where.name})", f"run-{where.name}", True)
    if where.is_dir() or "/" in target:
        return Target(target, target, where.name or "model", True)
    raise ConfigError(f"target={target} is neither student, teacher, a directory nor a hub name (owner/name)")


def evaluated_config(cfg: EvalRunConfig) -> tuple[EvalRunConfig, Target]:
    """The config with the target in the student's place (no KL columns for the teacher against itself), checked
    as far as files tell (kltd.train.preflight) before any model loads."""
    cfg.check()
    if cfg.sampling.backend == "vllm":
        import importlib.util

        from kltd.rollout.vllm_sampler import MISSING

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(MISSING)
    target = resolve_target(cfg)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, student=target.model),
                              eval=dataclasses.replace(cfg.eval, kl=cfg.eval.kl and target.teacher_columns))
    preflight(cfg)
    return cfg, target


def eval_job(cfg: EvalRunConfig, run_dir: Path, *, config_dict: dict | None = None,
             console: Console | None = None) -> dict:
    """Evaluate the target on every set of eval.sets; returns (and writes as metrics.json) the summary."""
    from kltd.train.threads import job_threads, threads_for

    console = console or Console()
    hub.forget()
    cfg, target = evaluated_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = redact(config_dict or dataclasses.asdict(cfg))
    say = plain_lines(console)
    identity = {"kind": "eval", "method": target.label, "evaluated": target.model, "teacher": cfg.model.teacher,
                "prefix": None, "trajectory": None, "seed": cfg.seed, "sweep": None}
    with exclusive_claim(run_dir):
        logger = RunLogger(run_dir, wandb_mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity,
                           name=f"eval-{target.slug}", group=None, job_type="eval", tags=["eval"],
                           config={**config_dict, "method": target.label}, init_timeout_s=cfg.wandb.init_timeout_s,
                           echo=say)
        started = time.perf_counter()
        try:
            job = Job(cfg, run_dir, Output(console, logger, run_dir), config_dict, evaluation_only=True)
            job.prepare()
            job.load()
            if job.plan.evaluation.student.decoder == "vllm":  # sampling.backend=vllm: the evaluated model's engine
                from kltd.train.trainer import vllm_sampler

                job.engines = {"student": vllm_sampler(cfg, "student", job.pair.student, job.pair.tokenizer,
                                                       job.pair.vocab_size)}
            pair = job.pair
            with job_threads(threads_for(cfg.trainer.num_threads, pair.device, (pair.teacher, pair.student))):
                say(f"evaluating {target.label} on {', '.join(cfg.eval.sets)}; results in {run_dir}")
                say(f"plan: evaluation: {job.plan.evaluation.text()}")
                job.display = RunProgress(console, target.label, total_steps=0, done_steps=0,
                                          every_steps=cfg.trainer.log_every, every_s=cfg.trainer.progress_every_s,
                                          enabled=cfg.trainer.progress)
                try:
                    with job.display:
                        result = job.evaluate(0)
                finally:
                    for engine in job.engines.values():
                        engine.close()
        except BaseException as error:
            atomic_write_json(run_dir / SUMMARY_FILE, {**identity, "status": "failed",
                                                       "error": f"{type(error).__name__}: {error}",
                                                       "config": config_dict})
            logger.finish(exit_code=1)
            raise
        summary = {**identity, "status": "completed", "wall_time_s": time.perf_counter() - started,
                   "eval_after": result, "eval_sets": {s.name: s.summary for s in job.eval_sets},
                   "data": job.data.summary, "plan": job.plan.record()["evaluation"], "phases": job.phases.seconds,
                   "memory": job.phases.memory(), "config": config_dict}
        logger.summary(final_figures(result))
        logger.finish()
        atomic_write_json(run_dir / SUMMARY_FILE, summary)
    console.print(evaluation_table(target.label, result))
    return summary
