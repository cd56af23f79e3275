"""How this rank's parameters map onto the full, unsharded model.

Every parameter has a *global name* (its name in a one-process model: layer numbers counted over all
pipeline stages, the last stage's copy of a tied embedding named after the embedding) and a *full shape*.
A tensor-parallel rank holds `stride` rectangular pieces of it along `partition_dim` (megatron's layout:
the full tensor cut into tp*stride equal pieces, rank r holding pieces r, r+tp, ...; stride is 2 for
SwiGLU's fc1 whose rows are [gate; up]). Initialisation, checkpoints and conversion all use this one map,
which is what makes them independent of the parallel layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset


@dataclass
class Piece:
    local: tuple[slice, ...]   # where the piece sits in the local tensor
    offsets: tuple[int, ...]   # where it starts in the full tensor
    shape: tuple[int, ...]


@dataclass
class ParamMap:
    local_name: str
    global_name: str
    param: torch.nn.Parameter
    shape: tuple[int, ...]     # this rank's tensor (its TP shard)
    full_shape: tuple[int, ...]
    pieces: list[Piece]
    owner: bool                # this rank's copy is the one that counts (see counted_once): it saves it


def global_name(local_name: str, layer_offset: int, tied: bool) -> str:
    parts = local_name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        parts[2] = str(int(parts[2]) + layer_offset)
    name = ".".join(parts)
    if tied and name == "output_layer.weight":
        name = "embedding.word_embeddings.weight"
    return name


def local_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape on this rank (under ZeRO-3 `param.shape` is empty: its data is partitioned)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def pieces_of(param: torch.Tensor) -> tuple[tuple[int, ...], list[Piece]]:
    """(full shape, this TP rank's pieces) of a parameter tagged by megatron with its TP partitioning."""
    shape = local_shape(param)
    if not getattr(param, "tensor_model_parallel", False):
        return shape, [Piece(tuple(slice(None) for _ in shape), (0,) * len(shape), shape)]
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    full = list(shape)
    full[dim] *= tp
    size = shape[dim] // stride
    pieces = []
    for i in range(stride):
        local = [slice(None)] * len(shape)
        local[dim] = slice(i * size, (i + 1) * size)
        offsets = [0] * len(shape)
        offsets[dim] = (rank + i * tp) * size
        piece_shape = list(shape)
        piece_shape[dim] = size
        pieces.append(Piece(tuple(local), tuple(offsets), tuple(piece_shape)))
    return tuple(full), pieces


def counted_once(param: torch.Tensor) -> bool:
    """Whether this rank's copy of `param` is the one that counts (in norms, in checkpoints): TP-sharded
    tensors on every TP rank, replicated ones on TP rank 0, and never the last pipeline stage's copy of a
    tied embedding (megatron marks that copy `shared`)."""
    if getattr(param, "shared", False):
        return False
    return getattr(param, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_rank() == 0


def param_maps(model: torch.nn.Module, tied: bool) -> list[ParamMap]:
    """This rank's parameters, in model order, with their place in the full model."""
    offset = get_transformer_layer_offset(model.config)
    maps = []
    for local, p in model.named_parameters():
        full, pieces = pieces_of(p)
        maps.append(ParamMap(local, global_name(local, offset, tied), p, local_shape(p), full, pieces, counted_once(p)))
    return maps


def shard_of(full: torch.Tensor, m: ParamMap) -> torch.Tensor:
    """This rank's local tensor cut out of the full tensor `full`."""
    out = torch.empty(m.shape, dtype=full.dtype, device=full.device)
    for pc in m.pieces:
        out[pc.local] = full[tuple(slice(o, o + s) for o, s in zip(pc.offsets, pc.shape))]
    return out
