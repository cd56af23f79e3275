"""The DeepSpeed engine around a megatron-core model, applied from outside the model.

- `check_layout` (plan.py, torch-free) refuses, before any work, the parallel combinations that are not known
  to be exact.
- `MegatronMPU` tells DeepSpeed megatron's process groups. Without it DeepSpeed treats tensor-parallel
  ranks as data-parallel ones and trains silently wrong; with pipeline parallelism its "model parallel"
  group must span TP x PP so gradient norms cover every stage.
- `build_engine` makes the AdamW optimizer (no decay on norms), the DeepSpeed config (ZeRO stage, bf16,
  clipping) and the engine. Gradient accumulation is owned by bigtrain: megatron's schedules run the
  microbatches, DeepSpeed runs in unmanaged-accumulation mode and reduces/steps once per `engine.step()`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..config import Config
from ..model.layout import counted_once
from . import deepspeed_fence as fence
from .plan import check_layout  # noqa: F401  (the layout rules, torch-free, shared with `bigtrain plan`)


class MegatronMPU:
    """DeepSpeed's `mpu` interface over megatron's parallel_state. 'Model parallel' is TP x PP."""

    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank():
        return dist.get_rank(group=ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size():
        return dist.get_world_size(group=ps.get_model_parallel_group())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def deepspeed_config(cfg: Config, dp: int) -> dict:
    t, p = cfg.train, cfg.parallel
    zero = {"stage": p.zero_stage}
    if p.zero_stage >= 1:
        zero.update(contiguous_gradients=True, reduce_bucket_size=50_000_000,
                    allgather_bucket_size=50_000_000, overlap_comm=p.zero_stage == 2 and torch.cuda.is_available())
    if p.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=50_000_000)
    return {
        # bigtrain runs the microbatches itself (megatron schedules) and calls engine.step() once per
        # global batch: DeepSpeed sees one "micro batch" per step and must not scale or count gradients.
        "train_micro_batch_size_per_gpu": t.global_batch_size // dp,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        # fp32 ZeRO-0 clips through `_fp32_clip`, which DeepSpeed only calls when this is > 0
        "gradient_clipping": t.grad_clip if p.zero_stage or t.precision == "bf16" else 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "data_types": {"grad_accum_dtype": "fp32"} if t.precision == "bf16" and p.zero_stage in (1, 2) else {},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                             eps=t.adam_eps, fused=fused, foreach=None if fused else True)


def grad_norm(params) -> float:
    """Global L2 norm of the gradients of this rank's `params`, each counted once over TP x PP x DP:
    TP-sharded tensors on every TP rank, replicated ones on TP rank 0, the last stage's copy of a tied
    embedding not at all. Gradients must already be averaged over data-parallel ranks."""
    sq = torch.zeros((), dtype=torch.float64, device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    for p in params:
        if p.grad is not None and counted_once(p):
            sq += p.grad.detach().double().square().sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return sq.sqrt().item()


def _fp32_clip(engine, cfg: Config):
    """ZeRO-0 in fp32 has no DeepSpeed optimizer wrapper; DeepSpeed's own clip for it neither counts pipeline
    stages other than the first nor skips the tied embedding's second copy. This one uses `grad_norm` (called
    after the data-parallel all-reduce) and returns the norm it measured."""

    def clip() -> float:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = grad_norm(params)
        if cfg.train.grad_clip > 0 and norm > cfg.train.grad_clip:
            coef = cfg.train.grad_clip / (norm + 1e-6)
            for p in params:
                p.grad.mul_(coef)
        return norm
    return clip


def build_engine(model: torch.nn.Module, cfg: Config):
    """Wrap this rank's model in a DeepSpeed engine; returns the engine."""
    import deepspeed

    dp = ps.get_data_parallel_world_size()
    for p in model.parameters():
        if getattr(p, "shared", False):  # the last stage's copy of a tied embedding: DeepSpeed's norms skip it
            fence.mark_pipeline_replica(p)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg),
                                           config=deepspeed_config(cfg, dp), mpu=MegatronMPU,
                                           dist_init_required=False)
    if not fence.uses_zero_optimizer(engine):
        fence.install_fp32_clip(engine, _fp32_clip(engine, cfg))
    fence.step_gate(engine)
    fence.route_recompute(cfg.parallel.partition_activations, cfg.parallel.offload_activations)
    return engine
