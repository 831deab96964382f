"""The Hydra edge's shared pieces: where the configs are, the schema and the resolvers that run and sweep
directory names use, composed configs turned into typed ones, and the one-line error every command ends with.

Nothing below kltd.app imports Hydra.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from kltd.files import DirectoryBusy, DiskFull
from kltd.schema.config import Config, ConfigError, config_method_label
from kltd.schema.matrix import cell_error, slug


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
# what a command reports as one line rather than a traceback (a DataError is a ValueError)
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, DirectoryBusy, DiskFull)
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


def to_typed(cfg: DictConfig) -> Config:
    return OmegaConf.to_object(cfg)


def fail(message: str, code: int = 2) -> None:
    print(f"kltd: error: {message}", file=sys.stderr)
    sys.exit(code)


def composition_error(error: Exception) -> str:
    """One line for what Hydra or OmegaConf refused (a typo in a group option or a key, a bad value)."""
    from hydra.errors import MissingConfigException

    if isinstance(error, MissingConfigException) and error.options is not None:
        group = (error.missing_cfg_file or "").split("/")[0]
        chosen = (error.missing_cfg_file or "").split("/")[-1]
        if group and chosen:
            return f"{group}={chosen} is not an option; choose one of: {', '.join(sorted(error.options))}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("To append"):  # Hydra's fix for a key a dict does not hold yet
        return f"{lines[0]} {lines[1][0].lower()}{lines[1][1:]}"
    return lines[0] if lines else type(error).__name__
