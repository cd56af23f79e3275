"""Who this process is in the job, read from the environment alone (no torch: the command line asks before the
heavy imports, e.g. to take the run directory's lock on rank 0 only).

Where the rank comes from, in order: torchrun / submitit variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), then SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the
step's first node), else a single process.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass


@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "single" | "torchrun" | "submitit" | "slurm" (srun)


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    from ..errors import BigtrainError
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise BigtrainError(f"SLURM node list {nodelist!r}: cannot tell its first host")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> Env:
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        launcher = "submitit" if e.get("SUBMITIT_EXECUTOR") == "slurm" else "torchrun"
        return Env(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                   e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), launcher)
    if int(e.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in e and "SLURM_STEP_ID" in e:
        nodes = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST", "127.0.0.1")
        port = int(e.get("MASTER_PORT", 0)) or 20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000
        return Env(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)),
                   e.get("MASTER_ADDR") or first_host(nodes), port, "slurm")
    return Env(0, 1, 0, "127.0.0.1", 0, "single")


def env_rank() -> int:
    """This process's rank as the launcher set it (0 for a single process)."""
    return launch_env().rank
