"""`kltd train`: the Hydra edge. Compose the config, check every job before anything runs, turn each
job's config into typed objects and hand them to kltd.train.job.

Nothing below kltd.app imports Hydra.
"""

from __future__ import annotations

import functools
import os
import secrets
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kltd.app.process import configure_process
from kltd.files import DirectoryBusy
from kltd.spec.config import Config, ConfigError, config_method_label
from kltd.spec.matrix import cell_error, slug

USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, DirectoryBusy)  # DataError is a ValueError
# Groups that are declared with no option chosen (conf/config.yaml): `method=opd` selects one. The older
# `+method=opd` spelling is accepted and read the same way.
OPTIONAL_GROUPS = ("method", "divergence", "sweep")


def config_dir() -> str:
    """Installed: kltd/conf inside the package. Source checkout (editable install): the top-level conf/."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"kltd's configs are missing (looked in {package / 'conf'}); reinstall kltd")


def _slug_resolver(*, _root_) -> str:
    """${kltd_slug:} in a run directory name: the method label of the config being run."""
    if cell_error(_root_.prefix.source, _root_.trajectory.supervisor):
        return f"invalid-{_root_.prefix.source}-{_root_.trajectory.supervisor}"
    return slug(config_method_label(_root_))


ConfigStore.instance().store(name="kltd_schema", node=Config)
TOKEN_VARIABLE = "KLTD_RUN_TOKEN"


def _process_token() -> str:
    """${kltd_token:} in a run or sweep directory name: four random hex digits, one per command, so that two
    runs started in the same second get two directories (the run then also claims its directory). Kept in
    the environment, so that the worker processes of a parallel launcher name the same sweep directory."""
    if not os.environ.get(TOKEN_VARIABLE):
        os.environ[TOKEN_VARIABLE] = secrets.token_hex(2)
    return os.environ[TOKEN_VARIABLE]


if not OmegaConf.has_resolver("kltd_slug"):
    OmegaConf.register_new_resolver("kltd_slug", _slug_resolver)
    OmegaConf.register_new_resolver("kltd_token", _process_token)

FAILED_JOBS: list[str] = []


def to_typed(cfg: DictConfig) -> Config:
    return OmegaConf.to_object(cfg)


def fail(message: str, code: int = 2) -> None:
    print(f"kltd: error: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def train(cfg: DictConfig) -> None:
    from kltd.train.interrupt import Interrupted
    from kltd.train.job import AlreadyFinished, train_job
    from kltd.train.trainer import TrainingError

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep = Path(hydra_cfg.sweep.dir).name if multirun else None
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job_process_settings(cfg, hydra_cfg)
    try:
        train_job(to_typed(cfg), run_dir, sweep=sweep, config_dict=OmegaConf.to_container(cfg, resolve=True),
                  worker_setup=functools.partial(configure_process, cfg.trainer.keep_freed_memory))
    except AlreadyFinished as done:
        print(f"kltd: {done}", file=sys.stderr)
    except Interrupted as stop:  # the whole command stops: a preempted sweep is requeued as one
        print(f"kltd: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except Exception as error:
        user_error = isinstance(error, (*USER_ERRORS, TrainingError))
        if not multirun and user_error:
            fail(str(error), 1)
        if not multirun:
            raise  # a bug: the traceback is what a report needs
        # a sweep goes on past a failed cell: one line here, the traceback in the job's own log, the failure
        # in its metrics.json (shown as failed by kltd compare)
        log = run_dir / "error.log"
        log.write_text(traceback.format_exc())
        FAILED_JOBS.append(f"{run_dir}: {error}")
        where = "" if user_error else f" (traceback in {log})"
        print(f"kltd: job {run_dir.name} failed: {type(error).__name__}: {error}{where}", file=sys.stderr)


def job_process_settings(cfg: DictConfig, hydra_cfg) -> None:
    """A parallel launcher runs jobs in worker processes: each gets the process settings once, and its share
    of the CPU threads, so that jobs side by side do not fight over the cores."""
    configure_process(cfg.trainer.keep_freed_memory)
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    if "Joblib" in launcher:
        import torch

        from kltd.train.threads import share_of_cores

        cores = os.cpu_count() or 1
        jobs = hydra_cfg.launcher.get("n_jobs") or -1
        torch.set_num_threads(share_of_cores(cores if jobs < 0 else min(jobs, cores)))


def unknown_keys(composed: DictConfig, typed) -> list[str]:
    """Keys in the composed config that the schema does not define (e.g. +trainer.max_step=5, a typo that
    `+` would otherwise add silently)."""
    import dataclasses

    def walk(node, schema, prefix: str) -> list[str]:
        names = {f.name: f for f in dataclasses.fields(schema)}
        found = []
        for key in node:
            if key == "hydra" and not prefix:
                continue
            if key not in names:
                found.append(prefix + str(key))
            elif dataclasses.is_dataclass(getattr(schema, key, None)) and OmegaConf.is_dict(node[key]):
                found += walk(node[key], getattr(schema, key), f"{prefix}{key}.")
        return found

    return walk(composed, typed, "")


def composition_error(error: Exception) -> str:
    """One line for what Hydra or OmegaConf refused (a typo in a group option or a key, a bad value)."""
    from hydra.errors import MissingConfigException

    if isinstance(error, MissingConfigException) and error.options is not None:
        group = (error.missing_cfg_file or "").split("/")[0]
        chosen = (error.missing_cfg_file or "").split("/")[-1]
        if group and chosen:
            return f"{group}={chosen} is not an option; choose one of: {', '.join(sorted(error.options))}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def job_overrides(overrides: list[str], multirun_flag: bool) -> tuple[bool, list[list[str]]]:
    """(multirun?, every job's overrides) exactly as Hydra will launch them: its own mode rule (-m, or
    hydra.mode in a preset such as sweep=matrix) and its basic sweeper's expansion of the command line
    and of hydra.sweeper.params."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_app = GlobalHydra.instance().hydra
    mode = hydra_app.get_mode(config_name="config", overrides=overrides)
    multirun = multirun_flag or mode == RunMode.MULTIRUN
    if not multirun:
        return False, [overrides]
    cfg = hydra_app.compose_config("config", overrides, run_mode=RunMode.MULTIRUN, with_log_configuration=False)
    params = cfg.hydra.sweeper.get("params") or {}
    task = list(OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))
    arguments = [f"{key}={value}" for key, value in params.items()] + task
    parsed = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(arguments)
    return True, [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def prevalidate(overrides: list[str], multirun_flag: bool) -> tuple[Config, int]:
    """Compose and check every job before Hydra creates run directories or loads any model; returns the
    first job's config and the number of jobs. Any problem ends the command with one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from kltd.train.preflight import preflight, writable_dir_problem

    # where Hydra will create directories (its default is under ./outputs): a file in the way, or no write
    # permission, would otherwise be a traceback from inside Hydra
    chosen = dict(o.partition("=")[::2] for o in overrides if o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")))
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        problem = writable_dir_problem(chosen.get(key) or "outputs")
        if problem:
            fail(f"{key}: {problem}")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        try:
            multirun, jobs = job_overrides(overrides, multirun_flag)
        except (HydraException, OmegaConfBaseException) as error:
            fail(composition_error(error))
        first = None
        for job in jobs:
            where = f" (in the job {' '.join(job)})" if len(jobs) > 1 else ""
            try:
                composed = compose("config", overrides=[o for o in job if not o.lstrip("+~").startswith("hydra")])
                cfg = to_typed(composed)
                unknown = unknown_keys(composed, cfg)
                if unknown:
                    raise ConfigError(f"unknown key {unknown[0]!r}: no such setting (`kltd train --help` lists "
                                      "every key)")
                preflight(cfg)
            except (HydraException, OmegaConfBaseException) as error:
                fail(composition_error(error) + where)
            except ConfigError as error:
                fail(f"{error}{where}")
            first = first or cfg
        if not multirun and chosen.get("hydra.run.dir"):
            existing_run(Path(chosen["hydra.run.dir"]), OmegaConf.to_container(composed, resolve=True))
    return first, len(jobs)


def side_by_side(argv: list[str], first: Config, jobs: int) -> list[str]:
    """A sweep of several jobs on a machine without a GPU runs them side by side, one per core with its share
    of the threads (hydra/launcher=joblib), unless the command names a launcher: a toy-sized job leaves most
    of a multi-core CPU idle. On a GPU, or for data-parallel jobs, the jobs run one after another."""
    cores = os.cpu_count() or 1
    named = any(a.startswith(("hydra/launcher=", "hydra.launcher.")) for a in argv)
    # no NVIDIA driver: no CUDA device (torch is not imported for this: the jobs import it in their own processes)
    on_cpu = first.model.device == "cpu" or (first.model.device == "auto" and not Path("/proc/driver/nvidia").exists())
    if jobs < 2 or cores < 2 or named or not on_cpu or first.distributed.nproc_per_node > 1:
        return argv
    print(f"kltd: {jobs} jobs side by side, {min(jobs, cores)} at a time on {cores} cores (hydra/launcher=joblib; "
          "hydra/launcher=basic runs them one after another)", file=sys.stderr)
    return [*argv, "hydra/launcher=joblib"]


def existing_run(run_dir: Path, config: dict) -> None:
    """A run directory given by name may hold a live run, a finished one or an unfinished one; settle it
    before Hydra writes its own files into the directory (a refused command must change nothing there)."""
    from kltd.files import directory_holder
    from kltd.report.redact import redact
    from kltd.train import checkpoint
    from kltd.train.job import check_resumable, read_summary

    if not run_dir.is_dir():
        return
    holder = directory_holder(run_dir)
    if holder:
        fail(f"{run_dir} is in use by a live run ({holder}); give this run another hydra.run.dir")
    summary = read_summary(run_dir / "metrics.json")
    if summary.get("status") == "completed":
        print(f"kltd: {run_dir} holds a finished run ({summary.get('method')}); nothing to do (give another "
              "hydra.run.dir to train again)", file=sys.stderr)
        sys.exit(0)
    resume = checkpoint.latest(run_dir, echo=lambda line: None)  # the job itself warns about a bad one
    if resume is not None:
        try:
            check_resumable(resume.config, redact(config), run_dir)
        except ConfigError as error:
            fail(str(error))


def normalized(argv: list[str]) -> list[str]:
    """`+method=opd` for an optional group reads as `method=opd` (the group is declared in the defaults)."""
    return [a[1:] if a.startswith("+") and a[1:].split("=", 1)[0] in OPTIONAL_GROUPS else a for a in argv]


def resumed(argv: list[str]) -> list[str]:
    """`resume=RUN_DIR [key=value ...]`: the run's own overrides again, in its own directory (one job)."""
    asked = [a for a in argv if a.startswith("resume=")]
    if not asked:
        return argv
    run_dir = Path(asked[-1].split("=", 1)[1]).expanduser()
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        fail(f"{run_dir} is not a kltd run directory (it has no .hydra/overrides.yaml)")
    import yaml

    previous = [o for o in yaml.safe_load(saved.read_text()) or [] if not o.lstrip("+").startswith("sweep=")]
    extra = [a for a in argv if not a.startswith("resume=") and a not in ("-m", "--multirun")]
    return [*previous, *extra, f"hydra.run.dir={run_dir}"]


def main(argv: list[str]) -> None:
    """`kltd train ARGS`: check every job first, apply the process settings once, then run the Hydra app."""
    from kltd.app.process import configure_process

    argv = normalized(resumed(argv))
    flags = [a for a in argv if a.startswith("-")]
    if all(f in ("-m", "--multirun") for f in flags):  # a real run, not --help/--cfg/--info
        first, jobs = prevalidate([a for a in argv if not a.startswith("-")], bool(flags))
        configure_process(first.trainer.keep_freed_memory)
        argv = side_by_side(argv, first, jobs)
    sys.argv = ["kltd train", *argv]
    train()
    from kltd.app.sweep_end import UNFINISHED

    failed = len(UNFINISHED) or len(FAILED_JOBS)
    if failed:
        fail(f"{failed} job(s) of the sweep did not complete; see their metrics.json", 1)
