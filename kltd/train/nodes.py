"""Which machines a run spans and where they meet: distributed.nnodes, node_rank and rdzv_endpoint as the user set
them, or as SLURM's variables give them in an `srun` step (one task per node), so that one `srun kltd train ...`
starts every node without rank arithmetic in the batch script.

Settings the user gave win over SLURM's; where they differ, the run says so in a line (a deliberate choice, such as
distributed.nnodes=1 for a one-machine run inside a larger allocation, is not an error).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from kltd.schema.config import Config, ConfigError

# one port per job (from its id), so two jobs whose first node is the same machine do not meet at one port
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000


def hostnames(nodelist: str) -> list[str]:
    """SLURM's compressed host list, expanded: 'gpu[01-03,7],login' -> gpu01 gpu02 gpu03 gpu7 login (a range keeps
    its zero padding; several bracket groups in one name multiply out)."""
    names: list[str] = []
    for item in _top_level(nodelist, ","):
        names.extend(_expand(item))
    return names


def _top_level(text: str, separator: str) -> list[str]:
    """`text` split at `separator` outside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _expand(name: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    head, tail = name[:match.start()], name[match.end():]
    out = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"SLURM node list {name!r}: cannot read the range {part!r}")
        for n in range(int(low), int(high or low) + 1):
            out.extend(f"{head}{n:0{len(low)}d}{rest}" for rest in _expand(tail) or [""])
    return out


def first_host(nodelist: str) -> str:
    """The first machine of a SLURM node list: `scontrol show hostnames` where SLURM's tools are installed (it
    knows every form), else kltd's own reading of the common bracket forms."""
    if shutil.which("scontrol"):
        try:
            shown = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                   timeout=30)
            if shown.returncode == 0 and shown.stdout.split():
                return shown.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        names = hostnames(nodelist)
    except ValueError as error:
        raise ConfigError(f"{error}; set distributed.rdzv_endpoint=HOST:PORT (node 0's address)") from None
    if not names:
        raise ConfigError(f"SLURM's node list {nodelist!r} names no machine; set distributed.rdzv_endpoint=HOST:PORT")
    return names[0]


@dataclasses.dataclass(frozen=True)
class Placement:
    cfg: Config  # with nnodes, node_rank and rdzv_endpoint filled in from SLURM where the user left them unset
    notes: list[str]  # where the user's settings and SLURM's differ


def placed(cfg: Config, environ: Mapping[str, str] | None = None) -> Placement:
    """`cfg` placed on its machines: the user's distributed.nnodes / node_rank / rdzv_endpoint, the unset ones
    taken from SLURM's variables of an srun step where they are present."""
    env = os.environ if environ is None else environ
    d = cfg.distributed
    if not env.get("SLURM_JOB_ID") or not env.get("SLURM_NNODES"):
        return Placement(cfg, [])
    slurm_nodes, slurm_rank = _integer(env, "SLURM_NNODES"), _integer(env, "SLURM_NODEID", 0)
    nnodes = d.nnodes if d.nnodes is not None else slurm_nodes
    notes = [f"distributed.nnodes={d.nnodes} is used, not SLURM_NNODES={slurm_nodes}"] \
        if d.nnodes is not None and d.nnodes != slurm_nodes else []
    if nnodes == 1:  # one machine: SLURM's rank and hosts do not matter
        return Placement(_with(cfg, nnodes=nnodes), notes)
    if "SLURM_STEP_ID" not in env and d.nnodes is None:
        raise ConfigError(f"SLURM_NNODES={slurm_nodes}, and this is not an srun step (the batch script itself, or a "
                          "salloc shell): start kltd on every node with `srun --ntasks-per-node=1 kltd train ...`, "
                          "or set distributed.nnodes=1 for one machine")
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if tasks and tasks.isdigit() and int(tasks) != slurm_nodes and d.nnodes is None:
        raise ConfigError(f"the SLURM step runs {tasks} tasks on {slurm_nodes} nodes; kltd starts its processes itself "
                          "(distributed.nproc_per_node), so run one task per node: srun --ntasks-per-node=1")
    node_rank = d.node_rank if d.node_rank is not None else slurm_rank
    if d.node_rank is not None and d.node_rank != slurm_rank:
        notes.append(f"distributed.node_rank={d.node_rank} is used, not SLURM_NODEID={slurm_rank}")
    endpoint = d.rdzv_endpoint
    if endpoint is None:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")  # SLURM_NODEID counts the step's
        if not nodelist:
            raise ConfigError("SLURM sets no SLURM_JOB_NODELIST here; set distributed.rdzv_endpoint=HOST:PORT "
                              "(node 0's address and a free port)")
        endpoint = f"{first_host(nodelist)}:{slurm_port(env['SLURM_JOB_ID'])}"
    return Placement(_with(cfg, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=endpoint), notes)


def endpoint_problem(cfg: Config) -> str | None:
    """Why the nodes cannot meet at distributed.rdzv_endpoint (its host is unknown here), found at once rather than
    after the launcher's wait for the other nodes; None when it resolves, or on one machine."""
    d = cfg.distributed
    if d.nodes == 1 or not d.rdzv_endpoint:
        return None
    host = d.rdzv_endpoint.rpartition(":")[0].strip("[]")
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return (f"distributed.rdzv_endpoint={d.rdzv_endpoint}: this machine cannot resolve the host {host!r}; give "
                "node 0's name or address as the other nodes reach it")
    return None


def slurm_port(job_id: str) -> int:
    digits = int(re.sub(r"\D", "", job_id) or 0)
    return SLURM_PORT_BASE + digits % SLURM_PORT_SPAN


def run_id(cfg: Config, environ: Mapping[str, str] | None = None) -> str:
    """The name every node of the run gives the launcher (the same on each: it prefixes their shared store)."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    return f"kltd-slurm-{job}" if job else "kltd-" + (cfg.distributed.rdzv_endpoint or "").replace(":", "-")


def node_directory(cfg: Config, run_dir: Path) -> Path:
    """Where this node's calling process writes: the run directory on node 0; run_dir/node-R on node R (its claim
    on the directory, its workers' logs and errors), so that nodes on a shared filesystem never write one file."""
    rank = cfg.distributed.node_rank or 0
    return run_dir if rank == 0 else run_dir / f"node-{rank}"


def _integer(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    if value is None or not value.strip().isdigit():
        raise ConfigError(f"SLURM's {name}={value!r} is not a number; set distributed.nnodes and "
                          "distributed.node_rank yourself")
    return int(value)


def _with(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, **changes))
