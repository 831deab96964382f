"""How `kltd train` runs a sweep: which launcher (jobs side by side on a machine without a GPU), whether that
launcher can start here, and what the sweep's job directories say when it ends or is stopped.

A sweep's outcome is read from its run directories (each job's metrics.json status), whatever launcher ran
the jobs, in this process or others.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path

from kltd.schema.config import Config

# Launchers whose jobs run on this machine, below this process: a signal to the command stops them all
# (kltd.train.interrupt.sweep_stops). A cluster's jobs (hydra/launcher=slurm) are the cluster's to stop.
LOCAL_LAUNCHERS = ("basic", "joblib", "submitit_local")


def side_by_side(argv: list[str], first: Config, jobs: int) -> list[str]:
    """A sweep of several jobs on a machine without a GPU runs them side by side, one per core with its share
    of the threads (hydra/launcher=joblib), unless the command names a launcher: a toy-sized job leaves most
    of a multi-core CPU idle. On a GPU, or for data-parallel jobs, the jobs run one after another."""
    cores = os.cpu_count() or 1
    named = any(a.startswith(("hydra/launcher=", "hydra.launcher.")) for a in argv)
    # no NVIDIA driver: no CUDA device (torch is not imported for this: the jobs import it in their own processes)
    on_cpu = first.model.device == "cpu" or (first.model.device == "auto" and not Path("/proc/driver/nvidia").exists())
    if jobs < 2 or cores < 2 or named or not on_cpu or first.distributed.world_size > 1:
        return argv
    print(f"kltd: {jobs} jobs side by side, {min(jobs, cores)} at a time on {cores} cores (hydra/launcher=joblib; "
          "hydra/launcher=basic runs them one after another)", file=sys.stderr)
    return [*argv, "hydra/launcher=joblib"]


def launcher_of(argv: list[str]) -> str:
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("hydra/launcher=")]
    return chosen[-1] if chosen else "basic"


def launcher_problem(launcher: str) -> str | None:
    """Why the named launcher cannot start here, before Hydra creates anything (submitit's own error is a
    traceback from inside Hydra)."""
    import shutil

    if launcher == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        return ("hydra/launcher=slurm needs SLURM: sbatch and srun are not on this machine's PATH; run the command "
                "on the cluster's login node, or try the sweep here with hydra/launcher=submitit_local")
    return None


def job_statuses(sweep_dir: str | Path) -> dict[Path, str | None]:
    """Each job directory of a sweep and its status in metrics.json (None: the job did not start, or ended
    before it could write one)."""
    def status_of(job: Path) -> str | None:
        try:
            return json.loads((job / "metrics.json").read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            return None

    root = Path(sweep_dir)
    jobs = sorted(p for p in root.iterdir() if (p / ".hydra").is_dir()) if root.is_dir() else []
    return {job: status_of(job) for job in jobs}


def stopped_sweep(asked: list[str], signum: int, sweep_dir: str) -> None:
    """A sweep stopped by SIGTERM or Ctrl-C, once its jobs have stopped: one line, exit 128 + the signal."""
    statuses = list(job_statuses(sweep_dir).values())
    counts = {status: statuses.count(status) for status in ("interrupted", None, "failed")}
    parts = [f"{counts['interrupted']} job(s) interrupted with a checkpoint"]
    parts += [f"{counts[None]} not started"] if counts[None] else []
    parts += [f"{counts['failed']} failed"] if counts["failed"] else []
    command = ["kltd", "train", *asked]
    if not any(a.startswith("hydra.sweep.dir=") for a in asked):
        command.append(f"hydra.sweep.dir={sweep_dir}")  # its name has the time it started
    print(f"kltd: sweep stopped by {signal.Signals(signum).name}: {', '.join(parts)}; resume with: "
          f"{shlex.join(command)}", file=sys.stderr)
    sys.exit(128 + signum)
