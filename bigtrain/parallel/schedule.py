"""One optimizer step of a megatron-core model inside a DeepSpeed engine, in two parts so that the update can
be vetoed:

    loss = forward_backward(engine, batch, cfg)             # megatron's schedule: the microbatches
    applied, grad_norm = optimizer_step(engine, cfg, decide)  # DeepSpeed: reduce, measure, clip, step?

megatron's forward-backward function runs the microbatches (plain accumulation with PP=1, 1F1B across
stages with PP>1) on the engine's module; DeepSpeed then reduces gradients over data-parallel ranks,
measures and clips them in `engine.step()`, where `decide(grad_norm)` is asked before AdamW runs.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..config import Config
from . import deepspeed_fence as fence
from .deepspeed_fence import uses_zero_optimizer


class _BackwardStart(torch.autograd.Function):
    """Identity whose backward runs first in each microbatch's backward pass and resets DeepSpeed's
    ZeRO backward bookkeeping, as a forward would. DeepSpeed assumes every backward follows its own
    forward; 1F1B runs several backwards in a row in its cool-down phase, and without the reset ZeRO-2's
    per-backward epilogue (which accumulates the reduced gradients) is skipped after the first."""

    @staticmethod
    def forward(ctx, x, optimizer):
        ctx.optimizer = optimizer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        fence.reset_backward_bookkeeping(ctx.optimizer)
        return grad, None


def _forward_step(engine, objective, data_iterator, model):
    tokens = next(data_iterator)
    zero = engine is not None and uses_zero_optimizer(engine)
    call = engine if zero else model
    if objective is None:
        out = call(tokens[:, :-1], None, None, labels=tokens[:, 1:])
    else:
        out = objective(call, tokens)
    if zero and out.requires_grad:
        out = _BackwardStart.apply(out, engine.optimizer)

    def loss_func(per_token_loss):
        total = per_token_loss.float().sum()
        count = torch.tensor(per_token_loss.numel(), dtype=torch.int, device=total.device)
        return total, count, {"loss": torch.stack([total.detach(), count.float()])}

    return out, loss_func


def forward_backward(engine, batch: torch.Tensor, cfg: Config, forward_only: bool = False,
                     model: torch.nn.Module | None = None, objective=None):
    """Run all microbatches of this rank's share of a global batch ([n, seq+1] token ids) through the
    engine (megatron's schedule sees the bare module, the calls go through the engine so DeepSpeed's
    hooks see every forward and backward). Returns the global mean token loss (same on every rank).
    `engine=None, model=M, forward_only=True`: the same for a bare model (evaluation outside training).
    `objective(call, tokens)`: the per-token loss [b, s] of a microbatch (tokens [b, s+1]; `call` runs the model
    and returns its logits) in place of the model's own cross-entropy (distillation)."""
    mb = cfg.train.micro_batch_size
    micro = list(batch.split(mb))
    losses = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, engine, objective),
        data_iterator=iter(micro),
        model=[model if model is not None else engine.module],
        num_microbatches=len(micro),
        seq_length=cfg.model.seq_length,
        micro_batch_size=mb,
        forward_only=forward_only,
    )
    return _global_mean_loss(losses, batch.device)


def _global_mean_loss(losses: list[dict], device) -> float:
    # [sum, count] from the last stage's TP rank 0 of every DP replica, zeros elsewhere; one all-reduce
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for d in losses:
            acc += d["loss"].to(acc)
    dist.all_reduce(acc)
    return (acc[0] / acc[1]).item()


def sync_tied_embedding_grads(model: torch.nn.Module, cfg: Config) -> None:
    """With PP > 1 and tied embeddings the first and last stages each hold a copy of the embedding:
    sum their gradients so both copies take the same update (megatron's finalize_model_grads does this
    for its own DDP; here the grads sit in param.grad until engine.step())."""
    if not (cfg.model.tie_embeddings and cfg.parallel.pipeline > 1):
        return
    if not (ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage()):
        return
    weight = model.shared_embedding_or_output_weight()
    dist.all_reduce(fence.local_grad(weight), group=ps.get_embedding_group())


def optimizer_step(engine, cfg: Config, decide=None) -> tuple[bool, float]:
    """Reduce, measure and clip the gradients, then update -- unless `decide(grad_norm) -> bool` says no.
    `decide` runs exactly once per call on every rank, at the same point (it may run collectives), also when
    DeepSpeed skips the update by itself (a non-finite norm under some ZeRO stages): then it is asked with that
    norm and its answer is moot. Returns (applied, global gradient norm before clipping)."""
    decide = decide or (lambda norm: True)
    sync_tied_embedding_grads(engine.module, cfg)
    gate = fence.step_gate(engine)
    gate.arm(decide)
    try:
        engine.step()
    finally:
        verdict = gate.disarm()
    if verdict is None:  # DeepSpeed skipped the update itself (its global norm was not finite, the same verdict
        decide(math.inf)  # on every rank): the agreement still runs once everywhere
        return False, math.inf
    return verdict, gate.grad_norm


def train_step(engine, batch: torch.Tensor, cfg: Config) -> tuple[float, float]:
    """Forward, backward, reduce, clip and step (no veto). Returns (loss, grad_norm)."""
    loss = forward_backward(engine, batch, cfg)
    _, norm = optimizer_step(engine, cfg)
    return loss, norm


def forward_only(model: torch.nn.Module, tokens: torch.Tensor, collect, **model_kwargs):
    """One forward pass of a bare model of any TP x PP layout over token ids [batch, seq] (no grad), through
    megatron's schedule: `collect(output)` of the last stage's output (logits [batch, seq, vocab / TP]) on the
    last pipeline stage's ranks, None on the others. `model_kwargs` go to the model (e.g. an inference context)."""
    def step(data_iterator, m):
        out = m(next(data_iterator), None, None, **model_kwargs)
        return out, lambda output, non_loss_data=False: collect(output)

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
            collect_non_loss_data=True)
    return out[0] if ps.is_pipeline_last_stage() else None


def logits(model: torch.nn.Module, tokens: torch.Tensor, cfg: Config) -> torch.Tensor | None:
    """Full-vocabulary logits [batch, seq, padded vocab] (fp32) of a bare model of any TP x PP layout for token
    ids [batch, seq]: on the last pipeline stage's ranks; None on the others."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    model.eval()
    return forward_only(model, tokens, lambda output: gather_from_tensor_model_parallel_region(output).float())
