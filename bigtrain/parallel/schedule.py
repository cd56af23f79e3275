"""One optimizer step of a megatron-core model inside a DeepSpeed engine.

megatron's forward-backward function runs the microbatches (plain accumulation with PP=1, 1F1B across
stages with PP>1) on the engine's module; DeepSpeed then reduces gradients over data-parallel ranks,
clips and steps in `engine.step()`.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..config import Config
from .engine import uses_zero_optimizer


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
        ctx.optimizer.clear_backward_seen_flag()
        return grad, None


def _forward_step(engine, data_iterator, model):
    tokens = next(data_iterator)
    if uses_zero_optimizer(engine):
        out = engine(tokens[:, :-1], None, None, labels=tokens[:, 1:])
        if out.requires_grad:
            out = _BackwardStart.apply(out, engine.optimizer)
    else:
        out = model(tokens[:, :-1], None, None, labels=tokens[:, 1:])

    def loss_func(per_token_loss):
        total = per_token_loss.float().sum()
        count = torch.tensor(per_token_loss.numel(), dtype=torch.int, device=total.device)
        return total, count, {"loss": torch.stack([total.detach(), count.float()])}

    return out, loss_func


def forward_backward(engine, batch: torch.Tensor, cfg: Config, forward_only: bool = False):
    """Run all microbatches of this rank's share of a global batch ([n, seq+1] token ids) through the
    engine (megatron's schedule sees the bare module, the calls go through the engine so DeepSpeed's
    hooks see every forward and backward). Returns the global mean token loss (same on every rank)."""
    mb = cfg.train.micro_batch_size
    micro = list(batch.split(mb))
    losses = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, engine),
        data_iterator=iter(micro),
        model=[engine.module],
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
    grad = _grad_of(weight)
    dist.all_reduce(grad, group=ps.get_embedding_group())


def _grad_of(param):
    """The locally accumulated (not yet data-parallel-reduced) gradient of `param`: DeepSpeed's bf16
    optimizer keeps it in fp32 in `_hp_grad`, ZeRO-1/2 with fp32 accumulation in `grad_accum`."""
    for attr in ("_hp_grad", "grad_accum", "grad"):
        g = getattr(param, attr, None)
        if g is not None:
            return g
    raise RuntimeError("tied embedding has no gradient to synchronise")


def train_step(engine, batch: torch.Tensor, cfg: Config) -> tuple[float, float]:
    """Forward, backward, reduce, clip and step. Returns (loss, grad_norm)."""
    loss = forward_backward(engine, batch, cfg)
    sync_tied_embedding_grads(engine.module, cfg)
    engine.step()
    norm = engine.get_global_grad_norm()
    return loss, float(norm) if norm is not None else float("nan")


def logits(model: torch.nn.Module, tokens: torch.Tensor, cfg: Config) -> torch.Tensor | None:
    """Full-vocabulary logits [batch, seq, padded vocab] (fp32) of a bare model of any TP x PP layout for token
    ids [batch, seq]: on the last pipeline stage's ranks; None on the others."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def step(data_iterator, m):
        out = m(next(data_iterator), None, None)

        def collect(output, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output).float()
        return out, collect

    model.eval()
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
            collect_non_loss_data=True)
    return out[0] if ps.is_pipeline_last_stage() else None
