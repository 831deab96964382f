"""One training job in its run directory, from a typed config to a finished run directory.

The run directory holds metrics.jsonl (one line per logged step), metrics.json (the summary; status
"completed" only once everything else is written, "interrupted" or "failed" otherwise), checkpoints/ (the
training state, for exact resume: kltd.train.checkpoint) and checkpoint/ (the trained student). The job
holds the directory exclusively while it runs, resumes it when it holds an unfinished run, and leaves no
state behind in the process: its models die with it, and the thread count it set is restored. The stages
themselves (data, models, evaluation, training) are kltd.train.stages.Job's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import time
from pathlib import Path

from rich.console import Console

from kltd import hub
from kltd.files import DiskFull, atomic_write_json, exclusive_claim
from kltd.report.logger import RunLogger
from kltd.report.redact import redact
from kltd.report.records import SUMMARY_FILE
from kltd.schema.config import Config, ConfigError
from kltd.schema.matrix import slug
from kltd.train import checkpoint
from kltd.train.evaluation import final_figures
from kltd.train.interrupt import Interrupted
from kltd.train.nodes import node_directory
from kltd.train.output import Output, plain_lines
from kltd.train.preflight import preflight
from kltd.train.ranks import SINGLE, Ranks
from kltd.train.stages import Job


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
    """Refuse a resume whose config would change the result (one line naming the keys). A key the saved config
    lacks (a setting added to kltd since) counts as its default, the value the run was made with."""
    defaults = _flat(dataclasses.asdict(Config()))
    a, b = {**defaults, **_flat(saved)}, {**defaults, **_flat(current)}
    # evaluation sets the run does not evaluate on are only the catalog it could have picked from
    unused = tuple(f"eval_sets.{name}." for name in {k.split(".")[1] for k in b if k.startswith("eval_sets.")}
                   if name not in ((current.get("eval") or {}).get("sets") or ["heldout"]))
    kept = RESUMABLE_CHANGES + unused
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(kept))
    if changed:
        shown = ", ".join(f"{k}={b.get(k)!r} (was {a.get(k)!r})" for k in changed[:4])
        raise ConfigError(f"{where} holds an unfinished run made with another config: {shown}"
                          f"{' ...' if len(changed) > 4 else ''}; rerun with its settings, or give another "
                          "hydra.run.dir to start afresh")


def train_job(cfg: Config, run_dir: Path, *, sweep: str | None = None, config_dict: dict | None = None,
              console: Console | None = None, worker_setup=None, notes: list[str] | tuple = ()) -> dict:
    """Check, train, evaluate and record one cell. Returns the summary written to metrics.json.

    A directory that holds an unfinished run's checkpoint is resumed (same config, or changes in
    RESUMABLE_CHANGES only); one that holds a finished run raises AlreadyFinished. With
    distributed.nproc_per_node > 1 the training runs in that many processes (kltd.train.data_parallel),
    each calling `worker_setup()` first (the entry point's process settings). `notes`: lines the command has for
    the user about this run, printed once it has started (models loaded), not before an error.
    """
    console = console or Console()
    hub.forget()  # whether the hub can be reached is this job's to find out (a sweep's earlier job may have)
    preflight(cfg)  # before any model is loaded
    run_dir = Path(run_dir)
    own = node_directory(cfg, run_dir)  # run_dir, or run_dir/node-R on node R of several
    own.mkdir(parents=True, exist_ok=True)
    with exclusive_claim(own):  # never two live runs in one directory
        if cfg.distributed.world_size > 1:
            from kltd.train.data_parallel import run_data_parallel

            job = functools.partial(claimed_job, notes=list(notes))
            return run_data_parallel(job, cfg, run_dir, sweep, config_dict, console, worker_setup)
        return claimed_job(cfg, run_dir, sweep, config_dict, console, notes=list(notes))


def claimed_job(cfg: Config, run_dir: Path, sweep: str | None, config_dict: dict | None, console: Console,
                ranks: Ranks = SINGLE, notes: list[str] | tuple = ()) -> dict | None:
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
    # on several machines each reads its own view of the directory: a checkpoint only some of them see would make
    # processes start from different steps
    step = resume.progress.step if resume is not None else -1
    if not ranks.agree(step):
        raise ConfigError(f"the processes of this run found different checkpoints in {run_dir} (this one: "
                          f"{'none' if step < 0 else f'step {step}'}); resuming on several nodes needs the run "
                          "directory on a filesystem they all share, with the same hydra.run.dir on each")
    if not ranks.main:
        Job(cfg, run_dir, Output.silent(run_dir), config_dict, ranks, sweep, resume, notes=list(notes)).run()
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
        summary = Job(cfg, run_dir, Output(console, logger, run_dir), config_dict, ranks, sweep, resume,
                      notes=list(notes)).run()
    except (Interrupted, KeyboardInterrupt) as stop:
        # a KeyboardInterrupt: Ctrl-C outside the training loop (loading, an evaluation) or a second one inside it;
        # a rerun resumes from the last checkpoint there is, if any
        if isinstance(stop, KeyboardInterrupt):
            last = checkpoint.latest(run_dir, echo=lambda line: None)
            stop_record = {"step": last.progress.step if last else None, "checkpoint": str(last.path) if last else None,
                           "signal": int(signal.SIGINT)}
        else:
            stop_record = {"step": stop.step, "checkpoint": str(stop.checkpoint), "signal": stop.signum}
        try:  # on a full disk the summary cannot be written; the checkpoint is saved, so a rerun resumes anyway
            atomic_write_json(summary_path, {**identity, "status": "interrupted", **stop_record,
                                             "wall_time_s": time.perf_counter() - started, "config": config_dict})
        except DiskFull:
            pass
        logger.finish(exit_code=128 + stop_record["signal"])
        raise
    except BaseException as error:
        try:  # on a full disk the summary cannot be written: the error itself still reaches the user
            atomic_write_json(summary_path, {**identity, "status": "failed",
                                             "error": f"{type(error).__name__}: {error}",
                                             "wall_time_s": time.perf_counter() - started, "config": config_dict})
        except DiskFull:
            pass
        logger.finish(exit_code=1)
        raise
    summary = {**identity, "status": "completed", "wall_time_s": time.perf_counter() - started, **summary,
               "config": config_dict}
    logger.summary(final_figures(summary["eval_after"]))
    if summary.get("eval_after_distillation"):  # with an RL stage: the figures it started from, beside final/
        logger.summary(final_figures(summary["eval_after_distillation"], under="before_rl"))
    logger.finish()
    atomic_write_json(summary_path, summary)
    return summary


def read_summary(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
