"""`kltd eval`: the Hydra edge of kltd.train.eval_job. Composed like `kltd train` (conf/eval.yaml: the same model=,
data= and eval_set groups, eval.* keys), checked before anything loads; `-m` sweeps over targets or sets."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kltd.app.compose import USER_ERRORS, config_dir, fail
from kltd.app.process import configure_process
from kltd.schema.config import ConfigError, EvalRunConfig

ConfigStore.instance().store(name="kltd_eval_schema", node=EvalRunConfig)


def _target_slug(*, _root_) -> str:
    """${kltd_target:}: the target's last path part, for the results directory's name."""
    name = Path(str(_root_.target).rstrip("/")).name or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


if not OmegaConf.has_resolver("kltd_target"):
    OmegaConf.register_new_resolver("kltd_target", _target_slug)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def evaluate(cfg: DictConfig) -> None:
    from kltd.train.eval_job import eval_job

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    typed = OmegaConf.to_object(cfg)
    try:
        eval_job(typed, run_dir, config_dict=OmegaConf.to_container(cfg, resolve=True))
    except USER_ERRORS as error:
        if not multirun:
            fail(str(error), 1)
        print(f"kltd: job {run_dir.name} failed: {error}", file=sys.stderr)


def prevalidate(argv: list[str]) -> None:
    """Compose and check every job (a typo, a missing model or set, a bad row) before Hydra creates a directory or
    a model loads: one line and exit code 2."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from kltd.app.checks import job_overrides, unknown_keys
    from kltd.app.compose import composition_error
    from kltd.train.eval_job import evaluated_config

    overrides = [a for a in argv if not a.startswith("-")]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        try:
            _, jobs, _ = job_overrides(overrides, any(a in ("-m", "--multirun") for a in argv), "eval")
            for job in jobs:
                composed = compose("eval", overrides=[o for o in job if not o.lstrip("+~").startswith("hydra")])
                typed = OmegaConf.to_object(composed)
                unknown = unknown_keys(composed, typed)
                if unknown:
                    raise ConfigError(f"unknown key {unknown[0]!r}: no such setting (`kltd eval --help` lists them)")
                evaluated_config(typed)
        except (HydraException, OmegaConfBaseException) as error:
            fail(composition_error(error))
        except USER_ERRORS as error:
            fail(str(error))


def main(argv: list[str]) -> None:
    if all(a in ("-m", "--multirun") for a in argv if a.startswith("-")):  # --help, --cfg: Hydra's own
        prevalidate(argv)
    configure_process(False)
    sys.argv = ["kltd eval", *argv]
    evaluate()
