"""Where a run's numbers go: metrics.jsonl in the run directory, and Weights & Biases.

W&B never blocks a run: with no credentials it logs offline and says so in one line; if an online
start fails (no network), it falls back to offline the same way.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from kltd.files import DiskFull, disk_full

WANDB_ID_FILE = ".wandb_run_id"  # one W&B run per run directory, resumed with it
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


PROBE_TIMEOUT_S = 3.0  # how long a job asks whether W&B's server answers before it tries an online start


def wandb_unreachable(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why W&B's server (WANDB_BASE_URL, else api.wandb.ai) cannot be reached, or None when a connection opens.
    Asked by each job, in at most `timeout_s`: without a network an online start would wait its whole
    init_timeout_s first (and each job of a sweep again)."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return None
    except OSError:
        return f"{host}:{port} cannot be reached"


def start_wandb(requested_mode: str, init: dict, *, where: Path, timeout_s: float = 30.0, echo=print):
    """(run, mode): a W&B run started online when asked or credentials exist, else offline with one line
    that says why; (None, "disabled") when W&B is off. An online start that fails (no network, a bad key)
    falls back to offline the same way: W&B never stops a run. Everything is decided per job: a failure of one
    job's start says nothing about the next one's."""
    mode, why = resolve_wandb_mode(requested_mode)
    if mode == "disabled":
        return None, mode
    import wandb

    if mode == "online":
        why = wandb_unreachable()
    if mode == "online" and why is None:
        try:
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout_s), **init), mode
        except Exception as error:  # network, auth: never fatal for the run itself
            why = f"online start failed ({type(error).__name__})"
            wandb.teardown()  # the failed attempt's service and its socket in the temp directory go with it
    echo(OFFLINE_NOTE.format(why=why or "offline mode requested", dir=where))
    if why and why.startswith("online start failed") and init.get("id"):
        init = {**init, "id": _new_run_id()}  # the failed attempt still holds its id in W&B's service
    try:  # silent: the line above is the one thing a user needs to know about offline logging
        return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **init), "offline"
    except Exception as error:
        echo(f"W&B: offline logging failed too ({type(error).__name__}); this run logs to local files only")
        return None, "disabled"


def _new_run_id() -> str:
    import secrets

    return secrets.token_hex(6)


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


class RunLogger:
    """Append-only metrics.jsonl plus an optional W&B run; one per training job."""

    def __init__(self, run_dir: Path, *, wandb_mode: str = "auto", project="kltd", entity=None, name="",
                 group=None, job_type="train", tags=(), config=None, init_timeout_s=30.0, echo=print,
                 resume_step: int | None = None):
        """resume_step: a resumed run keeps the lines up to that step (the rest were logged after its last
        checkpoint and will be logged again) and continues the same W&B run."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.path.write_text("" if resume_step is None else self._lines_up_to(resume_step))
        id_file = self.run_dir / WANDB_ID_FILE
        if resume_step is None or not id_file.is_file():
            id_file.write_text(_new_run_id())
        init = dict(project=project, entity=entity, name=name, group=group, job_type=job_type, tags=list(tags),
                    config=config or {}, dir=str(self.run_dir), reinit="finish_previous",
                    id=id_file.read_text().strip(), resume="allow")
        self.wandb_run, self.wandb_mode = start_wandb(wandb_mode, init, where=self.run_dir, timeout_s=init_timeout_s,
                                                      echo=echo)
        if self.wandb_run is not None:
            id_file.write_text(self.wandb_run.id)  # the run a resume continues (a fallback may have a new id)
            self._define_metrics()

    def _lines_up_to(self, step: int) -> str:
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return ""
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except ValueError:  # a torn last line from the kill
                continue
        return "".join(kept)

    def _define_metrics(self) -> None:
        """Training and evaluation curves share the optimiser step as their x-axis."""
        run = self.wandb_run
        run.define_metric("trainer/step")
        for pattern in ("train/*", "eval/*", "cost/*"):
            run.define_metric(pattern, step_metric="trainer/step")
        run.define_metric("eval/accuracy", step_metric="trainer/step", summary="max,last")

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as error:
            if disk_full(error, self.run_dir):
                raise DiskFull(self.path) from error
            raise
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


class QuietLogger:
    """What the other processes of a data-parallel run log: nothing (process 0 logs the whole step)."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass
