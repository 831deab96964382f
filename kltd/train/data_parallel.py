"""One run in distributed.nproc_per_node processes, started by torch's own launcher (torch.distributed.elastic), on
one machine or on each of distributed.nnodes machines.

The calling process (the Hydra job: one per cell of a sweep, so multiruns of data-parallel jobs compose)
holds the run directory and starts the workers; each worker joins the process group and runs the same
job as a one-process run with its place in it (kltd.train.ranks). Process 0 evaluates, logs and writes the
run directory; the others train their share and stay quiet. A worker's error comes back to the caller as
the same one line a one-process run would print (its traceback in the run directory's error files).

On several machines every node runs the same command; node 0's first process is process 0. The caller on node
R > 0 holds only run_dir/node-R (kltd.train.nodes.node_directory), where its workers' logs and errors go; its
workers read the run directory (a checkpoint to resume from) and write nothing there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import shutil
import socket
import traceback
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from rich.console import Console

from kltd.schema.config import Config, ConfigError
from kltd.train import nodes
from kltd.train.ranks import Ranks
from kltd.train.threads import share_of_cores

ERRORS = "worker-errors"  # under the run directory: one file per failed worker
SHUTDOWN_TIMEOUT_S = 120
COLLECTIVE_TIMEOUT_MIN = 60
RENDEZVOUS_TIMEOUT_S = 900  # how long the nodes of a run wait for each other to start (a cluster's nodes start apart)


class WorkerFailed(RuntimeError):
    """A worker process died without saying why (killed, out of memory): its logs are in the run directory."""


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(cfg: Config) -> str:
    import torch

    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    return "nccl" if cfg.model.device != "cpu" and torch.cuda.is_available() else "gloo"


def run_data_parallel(job, cfg: Config, run_dir: Path, sweep: str | None, config_dict: dict | None,
                      console: Console, worker_setup=None) -> dict:
    """Run `job` (kltd.train.job.claimed_job) in nproc_per_node processes on this machine; returns process 0's
    summary. Each worker calls `worker_setup()` first (a picklable callable: the entry point's process
    settings)."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = cfg.distributed.nproc_per_node
    backend = backend_for(cfg)
    if backend == "nccl":
        import torch

        if torch.cuda.device_count() < n:
            raise ConfigError(f"distributed.nproc_per_node={n} needs {n} GPUs, this machine has "
                              f"{torch.cuda.device_count()}; use fewer processes or distributed.backend=gloo")
    d = cfg.distributed
    own = nodes.node_directory(cfg, run_dir)  # this node's caller's: run_dir itself on node 0
    errors = own / ERRORS
    shutil.rmtree(errors, ignore_errors=True)  # an earlier attempt's
    logs = DefaultLogsSpecs(log_dir=str(own / "worker-logs"))
    # on SIGTERM the agent passes the signal on and waits this long for the workers' checkpoint before killing them
    if d.nodes == 1:
        launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"kltd-{uuid.uuid4().hex[:8]}",
                              rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                              start_method="spawn", logs_specs=logs, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    else:  # torch's static rendezvous: node R's processes are ranks R*n .. R*n + n-1, node 0 holds the store
        launch = LaunchConfig(min_nodes=d.nodes, max_nodes=d.nodes, nproc_per_node=n, run_id=nodes.run_id(cfg),
                              rdzv_backend="static", rdzv_endpoint=d.rdzv_endpoint,
                              rdzv_configs={"rank": d.node_rank, "timeout": RENDEZVOUS_TIMEOUT_S}, max_restarts=0,
                              start_method="spawn", logs_specs=logs, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    where = (f" on each of {d.nodes} nodes (this is node {d.node_rank}, meeting at {d.rdzv_endpoint})"
             if d.nodes > 1 else "")
    console.print(f"data parallel: {n} processes ({backend}){where}, {cfg.trainer.batch_size // d.world_size} rows "
                  "each per micro-batch", highlight=False)
    try:
        with _quiet_launcher():  # a worker's error reaches the user as one line (its traceback: worker-errors/)
            results = elastic_launch(launch, _worker)(job, cfg, str(run_dir), sweep, config_dict, backend, str(errors),
                                                  worker_setup)
    except (ChildFailedError, SignalException) as failure:
        raise _first_error(run_dir, errors) or WorkerFailed(
            f"a training process failed ({failure}); see {own / 'worker-logs'}") from None
    except DistError as failure:  # the launcher's own meeting of the nodes, before any worker started
        if d.nodes == 1:
            raise
        reason = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
        raise ConfigError(f"the {d.nodes} nodes did not all meet at distributed.rdzv_endpoint={d.rdzv_endpoint} "
                          f"({reason}); start the same command on every node, with node 0 reachable at that address "
                          "and the port free there") from None
    if d.nodes > 1 and d.node_rank:
        console.print(f"node {d.node_rank} of {d.nodes}: its processes' share is trained; node 0 holds the run's "
                      f"results in {run_dir}", highlight=False)
    return results.get(0)  # keyed by global rank: process 0's summary, None on the other nodes


@contextmanager
def _quiet_launcher():
    # torch's modules set their own levels, so each logger under these names is quietened, not just the parent
    names = [name for name in logging.root.manager.loggerDict
             if name.startswith(("torch.distributed.elastic", "torch.multiprocessing"))]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _first_error(run_dir: Path, errors: Path) -> BaseException | None:
    """The first exception a worker saved (the others' usually follow from it: a peer that left), rebuilt. On a
    filesystem the nodes share, node 0 sees the other nodes' errors too (run_dir/node-R/worker-errors)."""
    folders = {errors, run_dir / ERRORS, *run_dir.glob(f"node-*/{ERRORS}")}
    saved = sorted((p for f in folders if f.is_dir() for p in f.glob("rank-*.pickle")),
                   key=lambda p: p.stat().st_mtime_ns)
    for path in saved:
        try:
            error = pickle.loads(path.read_bytes())
            error.add_note(f"(in a training process; its traceback: {path.with_suffix('.txt')})")
            return error
        except Exception:  # an exception that does not survive pickling: its line is still there
            text = path.with_suffix(".txt").read_text() if path.with_suffix(".txt").exists() else path.name
            return WorkerFailed(text.splitlines()[0])
    return None


def _worker(job, cfg: Config, run_dir: str, sweep: str | None, config_dict: dict | None, backend: str,
            errors: str, worker_setup):
    import torch
    import torch.distributed as dist

    if worker_setup is not None:
        worker_setup()
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    if backend == "nccl":
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=f"cuda:{local}"))
    else:  # this machine's processes share its cores
        torch.set_num_threads(share_of_cores(int(os.environ["LOCAL_WORLD_SIZE"])))
    # process 0 evaluates while the others wait at the next step's first collective
    dist.init_process_group(backend, timeout=timedelta(minutes=COLLECTIVE_TIMEOUT_MIN))
    try:
        console = Console() if ranks.main else Console(quiet=True)
        return job(cfg, Path(run_dir), sweep, config_dict, console, ranks=ranks)
    except BaseException as error:
        _save_error(Path(errors), ranks.rank, error)
        raise
    finally:
        dist.destroy_process_group()


def _save_error(errors: Path, rank: int, error: BaseException) -> None:
    errors.mkdir(parents=True, exist_ok=True)
    (errors / f"rank-{rank}.txt").write_text(f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
    try:
        (errors / f"rank-{rank}.pickle").write_bytes(pickle.dumps(error))
    except Exception:
        pass
