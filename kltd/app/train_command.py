"""`kltd train`: the Hydra edge. Compose the config, check every job before anything runs, turn each
job's config into typed objects and hand them to kltd.train.job.

Nothing below kltd.app imports Hydra.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kltd.spec.config import Config, ConfigError, config_method_label
from kltd.spec.matrix import cell_error, slug

USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)  # DataFileError is a ValueError
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
if not OmegaConf.has_resolver("kltd_slug"):
    OmegaConf.register_new_resolver("kltd_slug", _slug_resolver)

FAILED_JOBS: list[str] = []


def to_typed(cfg: DictConfig) -> Config:
    return OmegaConf.to_object(cfg)


def fail(message: str, code: int = 2) -> None:
    print(f"kltd: error: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def train(cfg: DictConfig) -> None:
    from kltd.train.job import train_job
    from kltd.train.trainer import TrainingError

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep = Path(hydra_cfg.sweep.dir).name if multirun else None
    try:
        train_job(to_typed(cfg), Path(hydra_cfg.runtime.output_dir), sweep=sweep,
                  config_dict=OmegaConf.to_container(cfg, resolve=True))
    except (*USER_ERRORS, TrainingError) as error:
        if not multirun:
            fail(str(error), 1)
        # a sweep goes on past a failed cell; the failure is recorded in that cell's metrics.json
        FAILED_JOBS.append(f"{hydra_cfg.runtime.output_dir}: {error}")
        print(f"kltd: job failed: {error}", file=sys.stderr)


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


def prevalidate(overrides: list[str], multirun_flag: bool) -> Config:
    """Compose and check every job before Hydra creates run directories or loads any model; returns the
    first job's config. Any problem ends the command with one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from kltd.train.preflight import preflight

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        try:
            multirun, jobs = job_overrides(overrides, multirun_flag)
        except (HydraException, OmegaConfBaseException) as error:
            fail(composition_error(error))
        first = None
        for job in jobs:
            where = f" (in the job {' '.join(job)})" if len(jobs) > 1 else ""
            try:
                cfg = to_typed(compose("config", overrides=[o for o in job if not o.lstrip("+~").startswith("hydra")]))
                preflight(cfg)
            except (HydraException, OmegaConfBaseException) as error:
                fail(composition_error(error) + where)
            except ConfigError as error:
                fail(f"{error}{where}")
            first = first or cfg
    return first


def normalized(argv: list[str]) -> list[str]:
    """`+method=opd` for an optional group reads as `method=opd` (the group is declared in the defaults)."""
    return [a[1:] if a.startswith("+") and a[1:].split("=", 1)[0] in OPTIONAL_GROUPS else a for a in argv]


def main(argv: list[str]) -> None:
    """`kltd train ARGS`: check every job first, apply the process settings once, then run the Hydra app."""
    from kltd.app.process import configure_process

    argv = normalized(argv)
    flags = [a for a in argv if a.startswith("-")]
    if all(f in ("-m", "--multirun") for f in flags):  # a real run, not --help/--cfg/--info
        first = prevalidate([a for a in argv if not a.startswith("-")], bool(flags))
        configure_process(first.trainer.keep_freed_memory)
    sys.argv = ["kltd train", *argv]
    train()
    if FAILED_JOBS:
        fail(f"{len(FAILED_JOBS)} job(s) of the sweep failed; see their metrics.json", 1)
