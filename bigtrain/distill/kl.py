"""KL(teacher || student) per token on tensor-parallel logit shards, without gathering the vocabulary.

Each tensor-parallel rank holds the logits of a slice of the (padded) vocabulary. Both log-softmaxes are formed
from two all-reduces each over the tensor-parallel group (the max, then the sum of exponentials); the KL terms are
summed over the local slice and all-reduced once more. Every rank ends up with the same per-token KL, like
megatron's vocab-parallel cross-entropy, and its backward is local: d KL / d student logits = (p_s - p_t) / T on
the rank's own slice. The teacher's logits get no gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _log_softmax(z: torch.Tensor, group) -> torch.Tensor:
    """log-softmax over a last dimension split across `group`'s ranks (z: this rank's slice, fp32)."""
    zmax = z.max(dim=-1, keepdim=True).values
    if group is not None:
        dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
    shifted = z - zmax
    total = shifted.exp().sum(dim=-1, keepdim=True)
    if group is not None:
        dist.all_reduce(total, group=group)
    return shifted - total.log()


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature: float, group):
        log_ps = _log_softmax(student.float() / temperature, group)
        log_pt = _log_softmax(teacher.float() / temperature, group)
        pt = log_pt.exp()
        kl = (pt * (log_pt - log_ps)).sum(dim=-1)
        if group is not None:
            dist.all_reduce(kl, group=group)
        ctx.save_for_backward(log_ps, pt)
        ctx.temperature, ctx.dtype = temperature, student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad):
        log_ps, pt = ctx.saved_tensors
        g = grad.unsqueeze(-1) * (log_ps.exp() - pt) / ctx.temperature
        return g.to(ctx.dtype), None, None, None


def vocab_parallel_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                      group=None) -> torch.Tensor:
    """Per-token KL(softmax(teacher/T) || softmax(student/T)) for logits [..., vocab slice] split over `group`
    (None: the whole vocabulary is here). Returns [...] (fp32), the same on every rank of the group."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {list(student.shape)} and teacher logits {list(teacher.shape)} differ")
    return _VocabParallelKL.apply(student, teacher.detach(), float(temperature), group)
