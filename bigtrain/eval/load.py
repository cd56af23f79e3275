"""A bigtrain checkpoint loaded for inference (evaluation, generation) into this process's layout.

    loaded = load_for_inference("runs/x", ["parallel.tensor=2"])   # under torchrun: every rank calls it
    loaded.cfg, loaded.model, loaded.path, loaded.meta, loaded.tokenizer

The config is the run's own (from the checkpoint's meta.json), with `overrides` applied on top. The layout is
TP1 x PP1 (every rank a whole model, data parallel) unless the overrides set `parallel.tensor` /
`parallel.pipeline`: it need not be the one the run trained with, since a checkpoint holds full tensors. The
model runs in fp32 with dropout off; no DeepSpeed engine, no optimizer state is read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config

# inference is fp32 whatever the run trained in (the checkpoint holds fp32 master weights), no recompute, and
# in one model replica per rank (TP1 x PP1) unless the overrides ask for another layout
INFERENCE = ("train.precision=fp32", "parallel.activation_checkpointing=none", "parallel.zero_stage=1",
             "parallel.tensor=1", "parallel.pipeline=1", "parallel.sequence_parallel=false")


@dataclass
class Loaded:
    cfg: Config
    model: torch.nn.Module   # this rank's pipeline stage / tensor shard, eval mode
    path: str                # the checkpoint directory that was loaded
    meta: dict               # its meta.json
    tokenizer: str           # the tokenizer the run used ("" when it names none)


def load_for_inference(src: str, overrides=(), backend: str = "auto") -> Loaded:
    """Every rank: the newest usable checkpoint of `src` (a run directory, its checkpoints/ or one checkpoint),
    loaded into the layout the overrides ask for, on this process's device."""
    from ..checkpoint import load_weights
    from ..checkpoint.store import checkpoint_config, checkpoint_tokenizer, resolve, validate
    from ..model import build_model
    from ..parallel import init_model_parallel, on_rank0, setup
    from ..parallel.engine import check_layout

    env, device = setup(backend)
    path = on_rank0(resolve, src)            # rank 0 picks and verifies it (checksums); every rank loads it
    meta = validate(path)
    cfg = checkpoint_config(meta, path, [*INFERENCE, *overrides])
    check_layout(cfg, env.world)
    init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed)
    model = build_model(cfg).to(device)
    load_weights(model, path, cfg.model.tie_embeddings)
    model.eval()
    return Loaded(cfg, model, path, meta, checkpoint_tokenizer(cfg, path))
