"""Process-group setup: the same `bigtrain train` runs as one process, under torchrun, and under srun
(the rank comes from the launcher's environment, see env.py). NCCL with one GPU per local rank when CUDA is
present, gloo and the CPU shims otherwise.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os

import torch
import torch.distributed as dist

from .env import Env, free_port, launch_env

_ENV: Env | None = None
log = logging.getLogger("bigtrain")


def nccl_debug_env(dump_dir: str, environ=os.environ) -> dict[str, str]:
    """NCCL's flight recorder and dump-on-timeout, as defaults the user's own settings win over: the variables
    this would set (not set yet in `environ`). The dumps go to `dump_dir/nccl_trace_rank_<R>`. Asynchronous
    error handling 3 (tear the process down without aborting the communicator) because the flight recorder does
    not dump with 1 (pytorch issue 121055)."""
    wanted = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
              "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": os.path.join(os.path.abspath(dump_dir), "nccl_trace_rank_"),
              "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_ENABLE_MONITORING": "1"}
    return {k: v for k, v in wanted.items() if k not in environ}


def setup(backend: str = "auto", timeout_s: float = 1800.0, dump_dir: str | None = None) -> tuple[Env, torch.device]:
    """Initialise torch.distributed (and DeepSpeed's comm layer on top of it); returns (env, device).
    `timeout_s`: the collective timeout until `set_collective_timeout` changes it. With NCCL, the flight
    recorder dumps into `dump_dir` on a timeout (nccl_debug_env). Later calls in the same process (e.g. several
    runs under one pytest + torchrun) reuse the group."""
    global _ENV
    from . import cpu_shims, deepspeed_fence
    cpu_shims.check_megatron()
    deepspeed_fence.check_version()
    env = _ENV = _ENV or launch_env()
    if env.launcher == "single" and not env.master_port:
        env.master_port = free_port()
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        cpu_shims.apply()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and dump_dir and not dist.is_initialized():
        extra = nccl_debug_env(dump_dir)
        if extra:
            os.makedirs(dump_dir, exist_ok=True)
            os.environ.update(extra)
            log.info("NCCL hang diagnostics: " + " ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world, timeout=datetime.timedelta(seconds=timeout_s))
    set_collective_timeout(timeout_s)
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
        from ..config import ConfigError
        raise ConfigError(f"parallel.tensor={tensor} x parallel.pipeline={pipeline} does not divide "
                         f"the world size {world}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
        release_groups()
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def set_collective_timeout(seconds: float) -> None:
    """The timeout of every collective from now on, on every process group of this process (the world's,
    megatron's, DeepSpeed's): start-up gets a long one, training a shorter one. torch sets a group's timeout only
    at its creation publicly; `_set_pg_timeout` and the group registry are private (read here and in
    release_groups only)."""
    from torch.distributed import distributed_c10d as c10d
    timeout = datetime.timedelta(seconds=seconds)
    for pg in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(pg):
            c10d._set_pg_timeout(timeout, pg)


def release_groups() -> None:
    """Destroy every process group but the default one, and DeepSpeed's caches of them. A gloo group keeps its
    own polling threads for as long as it lives, and megatron's destroy_model_parallel only forgets its groups:
    a process that builds several layouts (the multi-rank test suite runs dozens of runs in one process) would
    pile up thousands of threads that slow every collective. torch has no public list of groups; its registry
    (`distributed_c10d._world.pg_map`, private) is read here and only here."""
    from torch.distributed import distributed_c10d as c10d

    from . import deepspeed_fence
    world = c10d.GroupMember.WORLD
    for pg in list(c10d._world.pg_map):
        if pg is not world:
            dist.destroy_process_group(pg)
    deepspeed_fence.forget_engines()
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    deepspeed_fence.clear_method_caches(RotaryEmbedding)  # its forward's lru_cache, keyed by module, keeps models
    gc.collect()  # the previous engine and its groups sit in reference cycles: free them (and their threads) now


def on_rank0(fn, *args):
    """Run `fn(*args)` on rank 0 only and hand its result to every rank. Whatever `fn` raises there is raised
    on every rank (otherwise the others would wait for rank 0 in their next collective): a BigtrainError as
    itself, anything else as a one-line BigtrainError naming it on the other ranks while rank 0 raises the
    original (with its traceback)."""
    from ..errors import BigtrainError
    box = [None, None]
    error = None
    if dist.get_rank() == 0:
        try:
            box[0] = fn(*args)
        except BigtrainError as e:
            box[1], error = ("bigtrain", str(e)), e
        except BaseException as e:  # noqa: B902 -- KeyboardInterrupt included: the other ranks must not wait
            box[1], error = ("other", f"{type(e).__name__}: {e}"), e
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        if error is not None:
            raise error
        kind, message = box[1]
        raise BigtrainError(message if kind == "bigtrain" else f"rank 0 failed in {getattr(fn, '__name__', fn)}: "
                            f"{message.splitlines()[0] if message else ''}")
    return box[0]


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
              "NCCL communicator was aborted", "ProcessGroupNCCL", "Socket Timeout")


def lost_peer(e: BaseException) -> str | None:
    """The first line of a collective's error when another rank died or hung (gloo: the peer's socket closed;
    NCCL: the watchdog aborted the communicator; both: a timeout), None for any other error."""
    if not isinstance(e, RuntimeError):
        return None
    text = str(e)
    if isinstance(e, getattr(dist, "DistError", ())) or any(p in text for p in _PEER_LOST):
        return (text.strip().splitlines() or [type(e).__name__])[0][:300]
    return None
