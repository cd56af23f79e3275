"""`bigtrain eval SRC [--data NAME=PATH ...] [--batches N] [overrides]`: held-out loss and perplexity of a
checkpoint, in any layout (one process, torchrun or srun; `parallel.tensor=2` etc. as overrides).

Each set is a shard directory (`bigtrain shards` output), a URL list, or text / jsonl / .gz files (a path or a
glob), which rank 0 tokenizes with the run's tokenizer into temporary shards of the model's sequence length
(packed like `bigtrain shards`: documents joined with EOS, the tail that fills no sample dropped). Without
`--data`, the run's own `data.validation` sets are evaluated.

A set is read in its stored order in global batches of `train.global_batch_size` samples (the run's, or an
override): every whole batch of the set, or the first `--batches`. The batch size does not depend on the
layout, so the same tokens are evaluated, and the same loss comes out, under any TP/PP/DP layout. Rank 0 prints
one JSON object: {"checkpoint", "step", "sets": {name: {"loss", "ppl", "tokens", "batches"}}}.

Text inputs are tokenized into a temporary directory that every rank must see (one node, or TMPDIR on a shared
file system); for multi-node runs, build shards first with `bigtrain shards`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import torch

from ..errors import BigtrainError
from ..parallel import forward_backward

def evaluate(engine, valid, cfg, batches: int | None = None, model=None) -> float:
    """Mean token loss over `batches` (default `train.eval_batches`) global batches from the start of one held-out
    set. `engine` None with `model`: a bare model (`bigtrain eval`)."""
    module = engine if engine is not None else model
    was_training = module.training
    module.eval()
    device = engine.device if engine is not None else next(model.parameters()).device
    with torch.no_grad():
        losses = [forward_backward(engine, batch.to(device), cfg, forward_only=True, model=model)
                  for batch in valid.batches(batches or cfg.train.eval_batches)]
    module.train(was_training)
    return sum(losses) / len(losses)


def perplexity(loss: float) -> float:
    """exp(mean token loss), inf where that overflows a float."""
    return math.exp(loss) if loss < 700 else math.inf


def metrics_of(losses: dict[str, float]) -> dict[str, float]:
    """{name: loss} -> the record entries: val/<name>/loss, val/<name>/ppl, and val_loss (the first set's)."""
    out = {}
    for name, loss in losses.items():
        out[f"val/{name}/loss"] = loss
        out[f"val/{name}/ppl"] = perplexity(loss)
    if losses:
        out["val_loss"] = next(iter(losses.values()))
    return out


def parse_sets(items: list[str]) -> list[tuple[str, str]]:
    """['web=/data/val', '/data/code'] -> [('web', '/data/val'), ('code', '/data/code')]."""
    out = []
    for item in items:
        name, path = item.split("=", 1) if "=" in item.split("/", 1)[0] else ("", item)
        name = name or os.path.basename(path.rstrip("/")) or path
        if "/" in name or not name.strip():
            raise BigtrainError(f"--data {item!r}: expected NAME=PATH with a name free of '/'")
        if not path:
            raise BigtrainError(f"--data {item!r}: no path")
        out.append((name, path))
    names = [n for n, _ in out]
    for n in names:
        if names.count(n) > 1:
            raise BigtrainError(f"--data: the name '{n}' is used twice (name the sets: --data NAME=PATH)")
    return out


def _is_text(path: str) -> bool:
    from ..data.tokenizer import expand_inputs
    if os.path.isdir(path):
        return False
    if "://" in path or path.startswith("pipe:"):
        return False
    try:
        files = expand_inputs([path])
    except BigtrainError:
        return False
    return bool(files) and not any(f.endswith(".tar") for f in files)


def _tokenize(name: str, path: str, tokenizer: str, seq_len: int, root: str) -> str:
    """Rank 0: text files -> shards under `root`; returns the shard directory."""
    from ..data import write_shards
    if not tokenizer:
        raise BigtrainError(f"--data {name}={path}: text needs a tokenizer, and the checkpoint names none (set "
                            "data.tokenizer=PATH)")
    out = os.path.join(root, name)
    manifest = write_shards(tokenizer, [path], out, seq_len, samples_per_member=16, shard_samples=1024, workers=1)
    if not manifest["samples"]:
        raise BigtrainError(f"--data {name}={path}: holds fewer than {seq_len + 1} tokens, not one sample of the "
                            f"model's sequence length")
    return out


def _prepare(sets, loaded, root) -> list[tuple[str, str]]:
    return [(name, _tokenize(name, path, loaded.tokenizer, loaded.cfg.model.seq_length, root) if _is_text(path)
             else path) for name, path in sets]


def evaluate_checkpoint(src: str, data: list[str] = (), batches: int | None = None, overrides=()) -> dict | None:
    """Every rank: evaluate; rank 0 returns the result (the others None)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ..data.remote import ReadOptions
    from ..data.sources import check_sources, open_source
    from ..data.validation import ValidationSource
    from ..parallel import on_rank0
    from .load import load_for_inference

    if batches is not None and batches < 1:
        raise BigtrainError(f"--batches {batches}: expected a positive number")
    sets = parse_sets(list(data))
    loaded = load_for_inference(src, overrides)
    cfg = loaded.cfg
    if not sets:
        sets = cfg.data.validation_sets()
        if not sets:
            raise BigtrainError(f"{loaded.path}: its run has no data.validation: name sets with --data NAME=PATH")
    root = on_rank0(tempfile.mkdtemp, "-eval", "bigtrain-") if any(_is_text(p) for _, p in sets) else None
    try:
        sets = on_rank0(_prepare, sets, loaded, root)
        if root and not os.path.isdir(root):
            raise BigtrainError(f"rank {dist.get_rank()}: {root} (text tokenized by rank 0) is not visible here: "
                                "build shards with `bigtrain shards` for multi-node evaluation")
        sources = [open_source(path, name, reading=ReadOptions.of(cfg.data)) for name, path in sets]
        tokenizer = None
        if cfg.data.tokenizer and os.path.exists(cfg.data.tokenizer):
            from ..data import load_tokenizer
            tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_sources(sources, cfg, tokenizer)
        G, S = cfg.train.global_batch_size, cfg.model.seq_length
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        results = {}
        for source in sources:
            total = source.manifest["samples"] if source.manifest else None
            n = batches if total is None else min(batches or total // G, total // G)
            if total is not None and total < G:
                raise BigtrainError(f"{source.name} ({source.path}) holds {total} samples, fewer than one global batch "
                                    f"of train.global_batch_size={G}: pass a smaller train.global_batch_size")
            if not n:
                raise BigtrainError(f"{source.name} ({source.path}): a URL list has no sample count; pass --batches N")
            valid = ValidationSource(source, seq_len=S, vocab_size=cfg.model.vocab_size, global_batch=G,
                                     dp_rank=dp_rank, dp_size=dp_size, max_skip_fraction=cfg.data.max_skip_fraction)
            loss = evaluate(None, valid, cfg, n, model=loaded.model)
            results[source.name] = {"loss": loss, "ppl": perplexity(loss), "tokens": n * G * S, "batches": n}
    finally:
        if root:
            on_rank0(shutil.rmtree, root, True)
    if dist.get_rank():
        return None
    return {"checkpoint": loaded.path, "step": loaded.meta.get("step"), "sets": results}


def main(src: str, data, batches, overrides) -> None:
    out = evaluate_checkpoint(src, data, batches, overrides)
    if out is not None:
        print(json.dumps(out), flush=True)
