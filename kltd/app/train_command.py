"""The Hydra edge: compose the config, turn it into typed objects, hand them to kltd.train.job.

Nothing below this module imports Hydra.
"""

from __future__ import annotations

import itertools
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


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every combination a basic multirun would launch (hydra.* overrides left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    choices = []
    for override in parsed:
        key = override.get_key_element()
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*choices)]


def prevalidate(overrides: list[str], multirun: bool) -> None:
    """Compose and validate every job before Hydra creates run directories or loads any model."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from kltd.spec.config import validate

    combos = expand_sweep(overrides) if multirun else [[o for o in overrides if not o.lstrip("+~").startswith("hydra")]]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for combo in combos:
            try:
                validate(to_typed(compose("config", overrides=combo)))
            except (HydraException, OmegaConfBaseException):
                return  # Hydra itself reports composition errors (with the valid options) below
            except ConfigError as error:
                where = f" (in the job {' '.join(combo)})" if multirun and len(combos) > 1 else ""
                fail(f"{error}{where}")


def main(argv: list[str]) -> None:
    """`kltd train ARGS`: check the config first, then run the Hydra app."""
    flags = [a for a in argv if a.startswith("-")]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if all(f in ("-m", "--multirun") for f in flags):  # a real run, not --help/--cfg/--info
        prevalidate([a for a in argv if not a.startswith("-")], multirun)
    sys.argv = ["kltd train", *argv]
    train()
    if FAILED_JOBS:
        fail(f"{len(FAILED_JOBS)} job(s) of the sweep failed; see their metrics.json", 1)
