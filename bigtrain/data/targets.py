"""What each token of a batch is trained on: the words of a batch (data/words.py) -> microbatches of model inputs,
labels, per-label weights and, with `data.document_masking`, per-document positions and attention masks.

The loss of a step is  sum(weight x token loss) / sum(weight)  over every label of the global batch, where a
label's weight is 0 when its token is not trained on (chat prompts, padding, the first token of a document under
document masking) and else its source's `data.sources[i].loss_weight` (1 by default, and in evaluation). The
denominator is summed over the data-parallel ranks before the forward pass, so the loss and its gradient are the
same for any DP / PP / microbatch split. With all weights 1 and every token trained (plain pretraining) this is
the mean token loss, computed with the same operations as a plain mean.

Documents: a token starts a document when its DOC_START flag is set (chat shards: only there) or, in a row
without flags, when it follows an EOS (plain shards: documents joined with EOS). Under document masking, attention stays inside a document and RoPE
positions restart at 0 at each document start.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .words import document_starts, unpack


@dataclass
class Microbatch:
    ids: torch.Tensor                     # [b, s+1] token ids
    weights: torch.Tensor                 # [b, s] float32 weight of each label (token 1..s)
    source: torch.Tensor                  # [b] source index of each row
    positions: torch.Tensor | None        # [b, s] RoPE positions of the inputs (document masking), else None
    attention_mask: torch.Tensor | None   # [b, 1, s, s] bool, True = may NOT attend (megatron's convention)
    per_microbatch: float                 # the step's global sum of weights / (DP size x microbatches)

    @property
    def inputs(self) -> torch.Tensor:
        return self.ids[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        return self.ids[:, 1:]


def document_positions(starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment index, position within its document) of each token, from the document starts [b, s]."""
    seg = torch.cumsum(starts.long(), dim=1)
    idx = torch.arange(starts.shape[1], device=starts.device).expand_as(seg)
    first = torch.where(starts, idx, torch.zeros_like(idx))
    first = torch.cummax(first, dim=1).values  # index of the latest document start at or before each token
    return seg, idx - first


def document_mask(seg: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] True where a query may NOT attend to a key: a later token or another document."""
    s = seg.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
    return ~((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


@functools.lru_cache(maxsize=8)
def eos_of(tokenizer: str) -> int | None:
    """The EOS id that joins plain shards' documents (data.tokenizer's), None without a tokenizer."""
    from .tokenizer import load_tokenizer
    return load_tokenizer(tokenizer).eos_id if tokenizer else None


def microbatches(batch: torch.Tensor, cfg, weighted: bool = True) -> list[Microbatch]:
    """This rank's share of a global batch of words [n, s+1], split into microbatches, with the step's global
    sum of weights (one all-reduce over the data-parallel group). `weighted`: apply the sources' loss weights
    (training); evaluation weighs every trained token 1."""
    ids, trained, flagged, source = unpack(batch)
    source = source[:, 0]
    masking = cfg.data.document_masking
    label_ok = trained[:, 1:]
    starts = None
    if masking:
        starts = document_starts(ids, eos_of(cfg.data.tokenizer), flagged)
        label_ok = label_ok & ~starts[:, 1:]  # a document's first token is not predicted from the one before
    weights = label_ok.float()
    lw = [s.loss_weight for s in cfg.data.sources]
    if weighted and any(w != 1.0 for w in lw):
        weights = weights * torch.tensor(lw, dtype=torch.float32, device=batch.device)[source][:, None]
    total = weights.sum(dtype=torch.float64)
    dp = 1
    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state as ps
        group = ps.get_data_parallel_group() if ps.model_parallel_is_initialized() else None
        dp = dist.get_world_size(group)
        if dp > 1:
            dist.all_reduce(total, group=group)
    mb = cfg.train.micro_batch_size
    n = -(-len(batch) // mb)
    per_microbatch = max(total.item(), 1.0) / (dp * n)
    out = []
    for i in range(0, len(batch), mb):
        rows = slice(i, i + mb)
        positions = mask = None
        if masking:
            seg, positions = document_positions(starts[rows, :-1])
            mask = document_mask(seg)
        out.append(Microbatch(ids[rows], weights[rows], source[rows], positions, mask, per_microbatch))
    return out
