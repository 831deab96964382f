"""Everything that can be checked before a model is loaded: the config (kltd.spec.config) and the files
it names. Raises ConfigError with one line that says what is wrong and how to fix it."""

from __future__ import annotations

import os
from pathlib import Path

from kltd.spec.config import Config, ConfigError
from kltd.train.models import check_model_reference


def writable_dir_problem(path: str | Path) -> str | None:
    """Why a directory could not be created and written at `path` (None: it can)."""
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"'{path}' cannot be a directory: '{probe}' is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"'{path}' cannot be written: no write permission on '{probe}'"
    return None


def preflight(cfg: Config) -> None:
    cfg.check()
    problem = writable_dir_problem(cfg.cache.dir)
    if problem:
        raise ConfigError(f"cache.dir: {problem}")
    for role in ("teacher", "student"):
        problem = check_model_reference(getattr(cfg.model, role))
        if problem:
            raise ConfigError(f"model.{role}: {problem}")
    responses = cfg.data.responses_file
    if responses is not None and not Path(responses).expanduser().is_file():
        raise ConfigError(f"data.responses_file '{responses}' does not exist (make one with `kltd make-data`)")
    if cfg.data.source == "file" and not Path(cfg.data.path).expanduser().exists():
        raise ConfigError(f"data.path '{cfg.data.path}' does not exist")
