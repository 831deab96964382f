"""`kltd train`'s checks before anything runs: the command line rewritten (resume=, +method=), every job of a
sweep composed exactly as Hydra will launch it and checked (config, files, data rows), a named run directory
settled, the toy defaults a run on its own pair keeps said in one line. Any problem ends the command with one
line, before Hydra creates a directory or a model loads.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kltd.app.compose import composition_error, config_dir, fail, to_typed
from kltd.schema.config import Config, ConfigError
from kltd.train.nodes import placed

# Groups that are declared with no option chosen (conf/config.yaml): `method=opd` selects one. The older
# `+method=opd` spelling is accepted and read the same way.
OPTIONAL_GROUPS = ("method", "divergence", "sweep", "rl")


@dataclass
class Checked:
    """What the checks found: the first job's config, the number of jobs, and for a sweep its directory."""

    first: Config
    jobs: int
    multirun: bool
    sweep_dir: str | None


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


def job_overrides(overrides: list[str], multirun_flag: bool, config_name: str = "config"
                  ) -> tuple[bool, list[list[str]], str | None]:
    """(multirun?, every job's overrides, the sweep's directory) exactly as Hydra will launch them: its own mode
    rule (-m, or hydra.mode in a preset such as sweep=matrix), its basic sweeper's expansion of the command line
    and of hydra.sweeper.params, and hydra.sweep.dir resolved once (its name holds the time), so that the
    command names the directory Hydra will use and reads its jobs' outcome from there."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_app = GlobalHydra.instance().hydra
    mode = hydra_app.get_mode(config_name=config_name, overrides=overrides)
    multirun = multirun_flag or mode == RunMode.MULTIRUN
    if not multirun:
        return False, [overrides], None
    cfg = hydra_app.compose_config(config_name, overrides, run_mode=RunMode.MULTIRUN, with_log_configuration=False)
    params = cfg.hydra.sweeper.get("params") or {}
    task = list(OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))
    arguments = [f"{key}={value}" for key, value in params.items()] + task
    parsed = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(arguments)
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return True, jobs, str(cfg.hydra.sweep.dir)


def prevalidate(overrides: list[str], multirun_flag: bool) -> Checked:
    """Compose and check every job before Hydra creates run directories or loads any model. Any problem ends the
    command with one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from kltd.files import directory_problem
    from kltd.train.preflight import preflight

    # where Hydra will create directories (its default is under ./outputs): a file in the way, no write
    # permission, or a place where nothing can be created (/proc, /sys, a read-only file system) would otherwise
    # be a traceback from inside Hydra. Tried, not asked of os.access (which says yes for /proc as root).
    chosen = dict(o.partition("=")[::2] for o in overrides if o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")))
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        problem = directory_problem(chosen.get(key) or "outputs")
        if problem:
            fail(f"{key}: {problem}")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        try:
            multirun, jobs, sweep_dir = job_overrides(overrides, multirun_flag)
        except (HydraException, OmegaConfBaseException) as error:
            fail(composition_error(error))
        checked = []  # every job's config checked first, then the files each names: no file is read for a sweep
        for job in jobs:  # that one of its jobs' settings refuses
            where = f" (in the job {' '.join(job)})" if len(jobs) > 1 else ""
            try:
                composed = compose("config", overrides=[o for o in job if not o.lstrip("+~").startswith("hydra")])
                cfg = placed(to_typed(composed)).cfg
                unknown = unknown_keys(composed, cfg)
                if unknown:
                    raise ConfigError(f"unknown key {unknown[0]!r}: no such setting (`kltd train --help` lists "
                                      "every key)")
                cfg.check()
            except (HydraException, OmegaConfBaseException) as error:
                fail(composition_error(error) + where)
            except ConfigError as error:
                fail(f"{error}{where}")
            checked.append((cfg, where))
        for cfg, where in checked:
            try:
                preflight(cfg)
            except ConfigError as error:
                fail(f"{error}{where}")
        first = checked[0][0]
        several = first.distributed.nodes > 1
        if several and multirun:
            fail(f"a sweep on several machines (distributed.nnodes={first.distributed.nodes}) is not built: run each "
                 "cell as its own command on every node, or sweep with hydra/launcher=slurm, one machine a job")
        if several and not chosen.get("hydra.run.dir"):
            fail(f"distributed.nnodes={first.distributed.nodes} runs one command on each machine: give them all the "
                 "same hydra.run.dir (on a filesystem they share, for a rerun to resume)")
        if not multirun and chosen.get("hydra.run.dir"):
            # node R > 0 holds only run_dir/node-R; node 0 holds the run directory itself
            existing_run(Path(chosen["hydra.run.dir"]), OmegaConf.to_container(composed, resolve=True),
                         held_here=not first.distributed.node_rank)
    return Checked(first, len(jobs), multirun, sweep_dir)


def toy_defaults_notes(cfg: Config, model_preset: str | None, overrides: list[str]) -> list[str]:
    """A line for a run that names its own pair but keeps settings tuned for the toy pair
    (kltd.schema.toy_defaults); [] otherwise. `overrides`: the job's command-line overrides."""
    from kltd.schema.toy_defaults import toy_defaults_kept, toy_defaults_line

    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}
    kept = toy_defaults_kept(cfg, model_preset or "toy", keys)
    return [toy_defaults_line(kept)] if kept else []


def existing_run(run_dir: Path, config: dict, held_here: bool = True) -> None:
    """A run directory given by name may hold a live run, a finished one or an unfinished one; settle it
    before Hydra writes its own files into the directory (a refused command must change nothing there)."""
    from kltd.files import directory_holder
    from kltd.report.redact import redact
    from kltd.train import checkpoint
    from kltd.train.job import check_resumable, read_summary

    if not run_dir.is_dir():
        return
    holder = directory_holder(run_dir) if held_here else None
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
