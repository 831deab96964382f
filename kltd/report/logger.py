"""Where a run's numbers go: metrics.jsonl in the run directory, and Weights & Biases.

W&B never blocks a run: with no credentials it logs offline and says so in one line; if an online
start fails (no network), it falls back to offline the same way.
"""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path

OFFLINE_NOTE = "W&B: {why}; logging offline to {dir} (upload later with: wandb sync {dir}/wandb/offline-run-*)"


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_wandb_mode(requested: str) -> tuple[str, str | None]:
    """The mode to start in and, when it is offline by necessity, why."""
    env_mode = os.environ.get("WANDB_MODE")
    if requested == "auto" and env_mode:
        requested = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
    if requested == "auto":
        return ("online", None) if has_wandb_credentials() else ("offline", "no credentials found")
    return requested, None


def start_wandb(requested_mode: str, init: dict, *, where: Path, timeout_s: float = 30.0, echo=print):
    """(run, mode): a W&B run started online when asked or credentials exist, else offline with one line
    that says why; (None, "disabled") when W&B is off. An online start that fails (no network, a bad key)
    falls back to offline the same way: W&B never stops a run."""
    mode, why = resolve_wandb_mode(requested_mode)
    if mode == "disabled":
        return None, mode
    import wandb

    if mode == "online":
        try:
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout_s), **init), mode
        except Exception as error:  # network, auth: never fatal for the run itself
            why = f"online start failed ({type(error).__name__})"
    echo(OFFLINE_NOTE.format(why=why or "offline mode requested", dir=where))
    # silent: the line above is the one thing a user needs to know about offline logging
    return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **init), "offline"


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


class RunLogger:
    """Append-only metrics.jsonl plus an optional W&B run; one per training job."""

    def __init__(self, run_dir: Path, *, wandb_mode: str = "auto", project="kltd", entity=None, name="",
                 group=None, job_type="train", tags=(), config=None, init_timeout_s=30.0, echo=print):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.path.write_text("")
        init = dict(project=project, entity=entity, name=name, group=group, job_type=job_type, tags=list(tags),
                    config=config or {}, dir=str(self.run_dir), reinit="finish_previous")
        self.wandb_run, self.wandb_mode = start_wandb(wandb_mode, init, where=self.run_dir, timeout_s=init_timeout_s,
                                                      echo=echo)
        if self.wandb_run is not None:
            self._define_metrics()

    def _define_metrics(self) -> None:
        """Training and evaluation curves share the optimiser step as their x-axis."""
        run = self.wandb_run
        run.define_metric("trainer/step")
        for pattern in ("train/*", "eval/*", "cost/*"):
            run.define_metric(pattern, step_metric="trainer/step")
        run.define_metric("eval/accuracy", step_metric="trainer/step", summary="max,last")

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({**metrics, "trainer/step": step}, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb_run is not None:
            for key, value in values.items():
                self.wandb_run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
