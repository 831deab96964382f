"""`kltd train`: the Hydra edge. Check every job before anything runs (kltd.app.checks), choose how a sweep runs
(kltd.app.sweeps), turn each job's config into typed objects and hand them to kltd.train.job.

Nothing below kltd.app imports Hydra.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kltd.app.checks import normalized, prevalidate, resumed, toy_defaults_notes
from kltd.app.compose import USER_ERRORS, config_dir, fail, to_typed
from kltd.app.process import configure_process
from kltd.app.sweeps import LOCAL_LAUNCHERS, job_statuses, launcher_of, launcher_problem, side_by_side, stopped_sweep
from kltd.files import DiskFull



def sweep_of(run_dir: Path) -> str | None:
    """The sweep a run directory belongs to: its parent's name if the parent is a sweep directory (Hydra writes
    multirun.yaml there). A job of a sweep resumed alone (resume=, or hydra.run.dir=) keeps its sweep."""
    return run_dir.parent.name if (run_dir.parent / "multirun.yaml").is_file() else None


def disk_full_line(error: BaseException, run_dir: Path) -> DiskFull | None:
    """A full disk anywhere in the job (a checkpoint, metrics.json, a log line) as one DiskFull naming the file
    and the checkpoint a rerun resumes from; None for any other error."""
    from kltd.files import disk_full
    from kltd.train import checkpoint

    if not disk_full(error):
        return None
    full = error if isinstance(error, DiskFull) else DiskFull(getattr(error, "filename", None) or run_dir)
    return checkpoint.resumable(full, run_dir)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def train(cfg: DictConfig) -> None:
    from kltd.train.interrupt import sweep_job

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = Path(hydra_cfg.sweep.dir).name if multirun else sweep_of(run_dir)
    with sweep_job() as stopped:
        if multirun and stopped is not None:
            return  # the sweep was stopped before this job began: it starts when the same command is rerun
        run_one_job(cfg, hydra_cfg, run_dir, multirun, sweep)


def run_one_job(cfg: DictConfig, hydra_cfg, run_dir: Path, multirun: bool, sweep: str | None) -> None:
    from kltd.train.interrupt import Interrupted, sweep_role
    from kltd.train.job import AlreadyFinished, train_job
    from kltd.train.nodes import placed
    from kltd.train.trainer import TrainingError

    job_process_settings(cfg, hydra_cfg)
    placement = placed(to_typed(cfg))
    typed = placement.cfg
    notes = toy_defaults_notes(typed, hydra_cfg.runtime.choices.get("model"), list(hydra_cfg.overrides.task))
    notes += placement.notes
    if typed.distributed.node_rank and run_dir.name == f"node-{typed.distributed.node_rank}":
        run_dir = run_dir.parent  # Hydra's directory on node R > 0 is run_dir/node-R (on_node)
    try:
        train_job(typed, run_dir, sweep=sweep, config_dict=OmegaConf.to_container(cfg, resolve=True),
                  worker_setup=functools.partial(configure_process, cfg.trainer.keep_freed_memory), notes=notes)
    except AlreadyFinished as done:
        print(f"kltd: job {run_dir.name} had finished; kept as it is" if multirun else f"kltd: {done}",
              file=sys.stderr)
    except Interrupted as stop:
        if multirun and sweep_role() is not None:
            return  # the sweep's parent says it once for all its jobs (kltd.train.interrupt)
        print(f"kltd: {stop}", file=sys.stderr)  # a preempted job of a cluster sweep is requeued on its own
        sys.exit(stop.exit_code)
    except Exception as error:
        error = disk_full_line(error, run_dir) or error
        user_error = isinstance(error, (*USER_ERRORS, TrainingError))
        if not multirun and user_error:
            fail(str(error), 1)
        if not multirun:
            raise  # a bug: the traceback is what a report needs
        # a sweep goes on past a failed cell: one line here, the traceback in the job's own log, the failure
        # in its metrics.json (shown as failed by kltd compare, counted by the command at the end)
        log = run_dir / "error.log"
        try:
            log.write_text(traceback.format_exc())
        except OSError:  # a full disk
            pass
        where = "" if user_error else f" (traceback in {log})"
        print(f"kltd: job {run_dir.name} failed: {type(error).__name__}: {error}{where}", file=sys.stderr)


def job_process_settings(cfg: DictConfig, hydra_cfg) -> None:
    """A parallel launcher runs jobs in worker processes: each gets the process settings once, and its share
    of the CPU threads, so that jobs side by side do not fight over the cores."""
    configure_process(cfg.trainer.keep_freed_memory)
    if hydra_cfg.runtime.choices.get("hydra/launcher") == "joblib":
        import torch

        from kltd.train.threads import share_of_cores

        cores = os.cpu_count() or 1
        jobs = hydra_cfg.launcher.get("n_jobs") or -1
        torch.set_num_threads(share_of_cores(cores if jobs < 0 else min(jobs, cores)))


def on_node(argv: list[str], cfg) -> list[str]:
    """On node R > 0 of several, Hydra writes its files (.hydra/, its log) in run_dir/node-R, the directory that
    node holds (kltd.train.nodes.node_directory), not over node 0's in a run directory the nodes share."""
    rank = cfg.distributed.node_rank
    if not rank:
        return argv
    return [f"{a.rstrip('/')}/node-{rank}" if a.startswith("hydra.run.dir=") else a for a in argv]


def main(argv: list[str]) -> None:
    """`kltd train ARGS`: check every job first, apply the process settings once, then run the Hydra app."""
    from kltd.train.interrupt import stop_asked, sweep_stops

    asked = list(argv)
    argv = normalized(resumed(argv))
    flags = [a for a in argv if a.startswith("-")]
    if not all(f in ("-m", "--multirun") for f in flags):  # --help, --cfg, --info: Hydra's own
        sys.argv = ["kltd train", *argv]
        train()
        return
    checked = prevalidate([a for a in argv if not a.startswith("-")], bool(flags))
    configure_process(checked.first.trainer.keep_freed_memory)
    if not checked.multirun:
        sys.argv = ["kltd train", *on_node(argv, checked.first)]
        train()
        return
    argv = side_by_side(argv, checked.first, checked.jobs)
    problem = launcher_problem(launcher_of(argv))
    if problem:
        fail(problem)
    if not any(a.startswith("hydra.sweep.dir=") for a in argv):
        argv.append(f"hydra.sweep.dir={checked.sweep_dir}")  # the directory whose jobs the outcome is read from
    sys.argv = ["kltd train", *argv]
    if launcher_of(argv) in LOCAL_LAUNCHERS:
        with sweep_stops():  # SIGTERM / Ctrl-C reach every job; the jobs stop with a checkpoint
            train()
        if stop_asked() is not None:
            stopped_sweep(asked, stop_asked(), checked.sweep_dir)
    else:
        train()
    unfinished = [job for job, status in job_statuses(checked.sweep_dir).items() if status != "completed"]
    if unfinished:
        fail(f"{len(unfinished)} job(s) of the sweep did not complete; see their metrics.json", 1)
