"""Moving training state between a DeepSpeed engine and layout-independent full tensors.

DeepSpeed keeps the fp32 master weights and AdamW moments partitioned over data-parallel ranks (ZeRO)
or plainly in the optimizer (ZeRO-0). For each parameter, `deepspeed.utils.safe_get_full_*` assembles
the tensor of this TP rank's shard (collective over the DP group) and `safe_set_full_*` puts one back
(local). bigtrain saves and loads those per-parameter tensors, so ZeRO stage and DP size can change
between save and load.
"""
from __future__ import annotations

import math

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)
from megatron.core import parallel_state as ps

from ..model.layout import ParamMap
from ..parallel.deepspeed_fence import (inner_optimizer, is_zero3_param, link_moments, local_fp32_fragment,
                                        stepped_tensors, uses_zero_optimizer)

MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_step(engine) -> int | None:
    """AdamW's step count, or None before the first step (no moments exist yet)."""
    for s in inner_optimizer(engine).state.values():
        if "step" in s:
            return int(s["step"].item())
    return None


def shard_state(engine, m: ParamMap, with_moments: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """({kind: fp32 tensor of this rank's TP shard: its full data-parallel state}, fresh) for one parameter; `fresh` is False when the
    tensors are the live training state (copy them before training goes on). Collective over the DP group
    under ZeRO: every DP rank calls it for every parameter in the same order."""
    p = m.param
    if not uses_zero_optimizer(engine):  # fp32 ZeRO-0: parameter and moments are plain tensors
        out = {"model": p.detach()}
        if with_moments:
            state = engine.optimizer.state[p]
            out.update({k: state[k] for k in MOMENTS})
        return out, False
    if ps.get_data_parallel_world_size() == 1:
        # nothing to gather: this rank's fragment is the whole tensor (a view of the live state)
        out = {"model": local_fp32_fragment(p, None)}
        if with_moments:
            out.update({k: local_fp32_fragment(p, k) for k in MOMENTS})
        if all(t is not None and t.numel() == math.prod(m.shape) for t in out.values()):
            return {k: t.view(m.shape) for k, t in out.items()}, False
    out = {"model": safe_get_full_fp32_param(p)}
    if with_moments:
        out.update({k: safe_get_full_optimizer_state(p, k) for k in MOMENTS})
    return out, True


def set_weights(engine, m: ParamMap, master: torch.Tensor) -> None:
    """Set the fp32 master weights of one parameter and the training-precision copy the model uses."""
    import deepspeed

    p = m.param
    master = master.to(p.device)
    if is_zero3_param(p):  # ZeRO-3: the model's copy is partitioned too
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(master)
    else:
        p.data.copy_(master)
    if uses_zero_optimizer(engine):
        safe_set_full_fp32_param(p, master)


def init_moments(engine) -> None:
    """Create AdamW's state (zero moments, step 0) as torch's AdamW would on its first step, so that
    saved moments can be loaded into an engine that has not stepped yet."""
    opt = inner_optimizer(engine)
    on_device = opt.param_groups[0].get("fused") or opt.param_groups[0].get("capturable")
    for p in stepped_tensors(engine):
        st = opt.state[p]
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
        for k in MOMENTS:
            if k not in st:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    link_moments(engine)


def set_moments(engine, m: ParamMap, moments: dict[str, torch.Tensor]) -> None:
    p = m.param
    for k in MOMENTS:
        value = moments[k].to(p.device)
        if uses_zero_optimizer(engine):
            safe_set_full_optimizer_state(p, value, k)
        else:
            engine.optimizer.state[p][k].copy_(value)


def set_optimizer_step(engine, step: int) -> None:
    for s in inner_optimizer(engine).state.values():
        s["step"].fill_(step)
