"""The frozen teacher: loaded from a bigtrain checkpoint into the student's tensor-parallel layout, checked
against the student (vocabulary, padded vocabulary, tokenizer, sequence length), identified exactly."""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from ..config import padded_vocab
from ..errors import BigtrainError

log = logging.getLogger("bigtrain")


def identity_of(path: str, meta: dict) -> dict:
    """What names a teacher checkpoint exactly: its directory, step and a digest of its files' checksums."""
    digest = hashlib.sha256(json.dumps(meta.get("files"), sort_keys=True).encode()).hexdigest()[:16]
    return {"path": os.path.abspath(path), "step": meta.get("step"), "files_digest": digest}


def _tokenizer_sha(path: str) -> str | None:
    if not path or not os.path.exists(path):
        return None
    from ..data import load_tokenizer
    return load_tokenizer(path).sha256


def check_compatible(cfg, tcfg, path: str) -> None:
    """One line naming both sides when teacher and student cannot be distilled into each other."""
    from ..checkpoint.store import checkpoint_tokenizer
    s, t = cfg.model, tcfg.model
    if (s.vocab_size, padded_vocab(s)) != (t.vocab_size, padded_vocab(t)):
        raise BigtrainError(f"distill.teacher {path} has vocabulary {t.vocab_size} (padded {padded_vocab(t)}), the "
                            f"student model.vocab_size {s.vocab_size} (padded {padded_vocab(s)}): teacher and student "
                            "must share the tokenizer and padded vocabulary")
    mine, theirs = cfg.data.tokenizer, checkpoint_tokenizer(tcfg, path)
    a, b = _tokenizer_sha(mine), _tokenizer_sha(theirs)
    if a and b and a != b:
        raise BigtrainError(f"distill.teacher {path} was trained with tokenizer {theirs} (sha256 {b[:12]}), the "
                            f"student uses data.tokenizer {mine} (sha256 {a[:12]}): they must be the same")
    if s.seq_length > t.seq_length:
        raise BigtrainError(f"distill.teacher {path} has model.seq_length {t.seq_length}, shorter than the "
                            f"student's {s.seq_length}")


def load_teacher(cfg, device, identity: dict | None = None):
    """Every rank: the frozen teacher of `cfg.distill.teacher` (or, on resume, the recorded `identity`) in this
    run's tensor-parallel layout and precision. Returns (model, identity, teacher config)."""
    from ..checkpoint import load_weights
    from ..checkpoint.store import checkpoint_config, resolve, validate
    from ..model import build_model
    from ..parallel import on_rank0
    if identity is not None and not os.path.isdir(identity["path"]):
        raise BigtrainError(f"distill.teacher: this run trained with the teacher checkpoint {identity['path']} (step "
                            f"{identity['step']}), which is gone; a resume needs that very teacher")
    # rank 0 resolves (a run directory -> its newest complete checkpoint) and verifies the files' checksums,
    # the recorded checkpoint on a resume as much as a new one
    path = on_rank0(resolve, identity["path"] if identity is not None else cfg.distill.teacher)
    meta = validate(path)
    found = identity_of(path, meta)
    if identity is not None and found != identity:
        raise BigtrainError(f"distill.teacher: {path} has changed since this run recorded it (step {found['step']} "
                            f"files {found['files_digest']}, recorded step {identity['step']} files "
                            f"{identity['files_digest']})")
    t, p = cfg.train, cfg.parallel
    tcfg = checkpoint_config(meta, path, [
        f"parallel.tensor={p.tensor}", "parallel.pipeline=1",
        f"parallel.sequence_parallel={str(p.sequence_parallel).lower()}", "parallel.activation_checkpointing=none",
        "parallel.zero_stage=1", f"train.precision={t.precision}", f"train.micro_batch_size={t.micro_batch_size}",
        f"train.global_batch_size={t.global_batch_size}", f"train.seed={t.seed}", "model.hidden_dropout=0",
        "model.attention_dropout=0"])
    check_compatible(cfg, tcfg, path)
    with torch.random.fork_rng(devices=[]):  # building the teacher draws no number from the run's generators
        model = build_model(tcfg).to(device)
    load_weights(model, path, tcfg.model.tie_embeddings)
    model.eval()
    model.requires_grad_(False)
    gib = sum(x.numel() * x.element_size() for x in model.parameters()) / 2**30
    log.info(f"distillation teacher {path} (step {found['step']}): {tcfg.model.num_layers} layers, hidden "
             f"{tcfg.model.hidden_size}, {gib:.3f} GiB of weights on this rank (TP={p.tensor}); alpha "
             f"{cfg.distill.alpha}, temperature {cfg.distill.temperature}"
             f"{', KD scaled by T^2' if cfg.distill.scale_by_t2 else ''}")
    return model, found, tcfg
