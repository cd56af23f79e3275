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


def _forward_step(engine, objective, tracked, data_iterator, model):
    mb = next(data_iterator)
    zero = engine is not None and uses_zero_optimizer(engine)
    call = engine if zero else model
    if objective is None:
        out = call(mb.inputs, mb.positions, mb.attention_mask, labels=mb.labels)
    else:
        out = objective(functools.partial(_with_documents, call, mb), mb.ids)
    if zero and out.requires_grad:
        out = _BackwardStart.apply(out, engine.optimizer)

    def loss_func(per_token_loss):
        # this microbatch's share of sum(weight * loss) / (the step's global sum of weights): megatron divides by
        # the microbatch count and DeepSpeed averages over data-parallel ranks, so divide by per_microbatch
        losses = per_token_loss.float()
        total = (losses * mb.weights).sum()
        report = [total.detach(), mb.weights.sum()]
        trained = (mb.weights > 0).float()
        for i in range(tracked):  # per source: mean loss over its trained tokens
            on = trained * (mb.source == i).float()[:, None]
            report += [(losses.detach() * on).sum(), on.sum()]
        return total / mb.per_microbatch, {"loss": torch.stack(report)}

    return out, loss_func


def _with_documents(call, mb, inputs, *_):
    """`call(inputs, None, None)` of an objective, with this microbatch's document positions and mask."""
    return call(inputs, mb.positions, mb.attention_mask)


def forward_backward(engine, batch: torch.Tensor, cfg: Config, forward_only: bool = False,
                     model: torch.nn.Module | None = None, objective=None, per_source: list | None = None):
    """Run all microbatches of this rank's share of a global batch ([n, seq+1] token words, data/words.py)
    through the engine (megatron's schedule sees the bare module, the calls go through the engine so DeepSpeed's
    hooks see every forward and backward). Returns the step's loss: the sum over trained tokens of weight x loss
    divided by the global sum of their weights (data/targets.py; the same for any DP / PP / microbatch split),
    on every rank.
    `engine=None, model=M, forward_only=True`: the same for a bare model (evaluation outside training).
    `objective(call, tokens)`: the per-token loss [b, s] of a microbatch (token ids [b, s+1]; `call` runs the model
    and returns its logits) in place of the model's own cross-entropy (distillation).
    `per_source`: a list filled with (mean loss or None, trained tokens) of each data source in the step (>1 source)."""
    from ..data.targets import microbatches
    mb = cfg.train.micro_batch_size
    micro = microbatches(batch, cfg, weighted=not forward_only)
    tracked = len(cfg.data.sources) if len(cfg.data.sources) > 1 else 0  # sources reported one by one
    losses = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, engine, objective, tracked),
        data_iterator=iter(micro),
        model=[model if model is not None else engine.module],
        num_microbatches=len(micro),
        seq_length=cfg.model.seq_length,
        micro_batch_size=mb,
        forward_only=forward_only,
    )
    acc = _global_sums(losses, batch.device, 2 + 2 * tracked)
    if per_source is not None:
        per_source[:] = [(float(acc[2 + 2 * i] / acc[3 + 2 * i]) if acc[3 + 2 * i] else None, int(acc[3 + 2 * i]))
                         for i in range(tracked)]
    return (acc[0] / acc[1]).item() if acc[1] else 0.0


def _global_sums(losses: list[dict], device, n: int) -> torch.Tensor:
    # the reported sums from the last stage's TP rank 0 of every DP replica, zeros elsewhere; one all-reduce
    acc = torch.zeros(n, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for d in losses:
            acc += d["loss"].to(acc)
    dist.all_reduce(acc)
    return acc


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
    positions, mask = model_kwargs.pop("position_ids", None), model_kwargs.pop("attention_mask", None)

    def step(data_iterator, m):
        out = m(next(data_iterator), positions, mask, **model_kwargs)
        return out, lambda output, non_loss_data=False: collect(output)

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
            collect_non_loss_data=True)
    return out[0] if ps.is_pipeline_last_stage() else None


def logits(model: torch.nn.Module, tokens: torch.Tensor, cfg: Config, **documents) -> torch.Tensor | None:
    """Full-vocabulary logits [batch, seq, padded vocab] (fp32) of a bare model of any TP x PP layout for token
    ids [batch, seq]: on the last pipeline stage's ranks; None on the others. `documents`: position_ids and
    attention_mask of packed documents (data/targets.py)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    model.eval()
    return forward_only(model, tokens, lambda output: gather_from_tensor_model_parallel_region(output).float(),
                        **documents)
