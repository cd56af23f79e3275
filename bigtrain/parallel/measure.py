"""What one rank's DeepSpeed engine actually holds: its state bytes by kind, to check `bigtrain plan` against.

Each element is counted once: tensors are grouped by the storage they view and only the bytes not already
covered by an earlier tensor of that storage count (so a flat buffer and the per-parameter views into it count
once, and a view into a larger buffer counts its own elements, not the whole buffer). Kinds are counted in the
order parameters, gradients, optimizer: a buffer that is both (ZeRO-0's AdamW steps the parameters themselves)
counts as the first.
"""
from __future__ import annotations

import torch

from .deepspeed_fence import state_tensors


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) byte range of `t` within its storage."""
    size = t.element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    start = t.storage_offset() * size
    return start, start + extent * size


def _new_bytes(covered: list[tuple[int, int]], start: int, end: int) -> int:
    """Bytes of [start, end) not in `covered` (disjoint ranges); adds the range to `covered`."""
    new = end - start
    for a, b in covered:
        new -= max(0, min(b, end) - max(a, start))
    merged = [(start, end)]
    for a, b in covered:
        if b < merged[0][0] or a > merged[0][1]:
            merged.append((a, b))
        else:
            merged[0] = (min(a, merged[0][0]), max(b, merged[0][1]))
    covered[:] = merged
    return new


def state_bytes(engine) -> dict[str, int]:
    """{"parameters", "gradients", "optimizer", "total"}: bytes of distinct elements this rank holds (see above)."""
    covered: dict[int, list[tuple[int, int]]] = {}
    out = {}
    for kind, tensors in state_tensors(engine).items():
        out[kind] = 0
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if not ptr or not t.numel():
                continue
            out[kind] += _new_bytes(covered.setdefault(ptr, []), *_span(t))
    out["total"] = sum(out.values())
    return out
