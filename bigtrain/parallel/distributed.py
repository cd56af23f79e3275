"""Process-group setup: the same `bigtrain train` runs as one process, under torchrun, and under srun.

Where the rank comes from, in order: torchrun / submitit variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), then SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the
step's first node), else a single process. NCCL with one GPU per local rank when CUDA is present, gloo
and the CPU shims otherwise.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _free_port() -> int:
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
    return Env(0, 1, 0, "127.0.0.1", _free_port(), "single")


_ENV: Env | None = None


def setup(backend: str = "auto", timeout_minutes: float = 30.0) -> tuple[Env, torch.device]:
    """Initialise torch.distributed (and DeepSpeed's comm layer on top of it); returns (env, device).
    Later calls in the same process (e.g. several runs under one pytest + torchrun) reuse the group."""
    global _ENV
    env = _ENV = _ENV or launch_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        from . import cpu_shims
        cpu_shims.apply()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    # DeepSpeed reads these (srun and single-process runs don't set them)
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world))
    import deepspeed
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    env.rank, env.world = dist.get_rank(), dist.get_world_size()
    return env, device


def init_model_parallel(tensor: int, pipeline: int, seed: int) -> None:
    """(Re)build megatron's TP/PP/DP groups for this layout and seed its model-parallel RNG tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = dist.get_world_size()
    if world % (tensor * pipeline):
        raise ValueError(f"parallel.tensor={tensor} x parallel.pipeline={pipeline} does not divide "
                         f"the world size {world}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def on_rank0(fn, *args):
    """Run `fn(*args)` on rank 0 only and hand its result to every rank. A BigtrainError raised there is
    raised on every rank (otherwise the others would wait for rank 0 in their next collective)."""
    from ..errors import BigtrainError
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn(*args)
        except BigtrainError as e:
            box[1] = e
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]
