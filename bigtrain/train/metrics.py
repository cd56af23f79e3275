"""What a run reports: `metrics.jsonl` (one JSON object per optimizer step), `events.jsonl` (starts,
resumes, checkpoints, requeues), TensorBoard scalars, and a short console line per logging interval.
Only rank 0 writes; the other ranks get a logger that does nothing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import time

import torch

from ..config import Config, ffn_size, kv_heads, padded_vocab

log = logging.getLogger("bigtrain")


def setup_logging(rank: int) -> None:
    """The `bigtrain` logger prints to stderr (INFO on rank 0, warnings and errors on the others)."""
    handler = next((h for h in log.handlers if getattr(h, "bigtrain", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.bigtrain = True
        log.addHandler(handler)
    handler.setFormatter(logging.Formatter(f"[bigtrain %(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S"))
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def num_params(cfg: Config) -> int:
    """Parameters of the whole (unsharded) model, padded vocabulary included."""
    m = cfg.model
    d, hd = m.hidden_size, m.hidden_size // m.num_attention_heads
    attn = d * (m.num_attention_heads + 2 * kv_heads(m)) * hd + m.num_attention_heads * hd * d
    layer = attn + 3 * d * ffn_size(m) + 2 * d
    emb = padded_vocab(m) * d
    return m.num_layers * layer + d + emb * (1 if m.tie_embeddings else 2)


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: 6N for the matmuls of forward+backward plus 12*L*d*S for attention
    (the convention of the GPU benchmark's peer, so MFU figures compare)."""
    m = cfg.model
    return 6 * num_params(cfg) + 12 * m.num_layers * m.hidden_size * m.seq_length


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


class Metrics:
    def __init__(self, cfg: Config, rank: int, world: int, start_step: int):
        self.cfg, self.world = cfg, world
        self.enabled = rank == 0
        self.flops_per_token = flops_per_token(cfg)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        self.tb = None
        if not self.enabled:
            return
        run = cfg.run.dir
        os.makedirs(run, exist_ok=True)
        _truncate_jsonl(os.path.join(run, "metrics.jsonl"), start_step)
        self.metrics = open(os.path.join(run, "metrics.jsonl"), "a")
        self.events = open(os.path.join(run, "events.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run, "tensorboard"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is an install requirement; keep training if it was removed
            log.warning("tensorboard is not installed: no TensorBoard events")

    def step(self, step: int, loss: float, lr: float, grad_norm: float, seconds: float, **extra) -> dict:
        tokens_per_s = self.tokens_per_step / seconds
        tflops = tokens_per_s * self.flops_per_token / self.world / 1e12
        rec = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                   tflops_per_device=tflops, mfu=tflops / self.cfg.train.peak_tflops,
                   step_seconds=seconds, mem_gib=peak_memory_gib(), **extra)
        if not self.enabled:
            return rec
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if self.tb:
            for k, v in rec.items():
                if k not in ("step", "val_loss") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if step % self.cfg.train.log_interval == 0 or step == self.cfg.train.steps or "val_loss" in extra:
            log.info(f"step {step}/{self.cfg.train.steps} | loss {loss:.4f} | lr {lr:.3e} | gnorm {grad_norm:.3f} | "
                     f"{tokens_per_s:,.0f} tok/s | {tflops:.1f} TFLOP/s/dev | MFU {100 * rec['mfu']:.1f}% | "
                     f"mem {rec['mem_gib']:.2f} GiB | {seconds:.2f} s"
                     + (f" | validation loss {extra['val_loss']:.4f}" if "val_loss" in extra else ""))
        return rec

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled and self.tb:
            self.tb.add_scalar(name, value, step)

    def event(self, kind: str, step: int, **fields) -> None:
        """A run event (start, resume, checkpoint, requeue...): events.jsonl, TensorBoard, console."""
        if not self.enabled:
            return
        rec = dict(event=kind, step=step, time=time.time(), **fields)
        self.events.write(json.dumps(rec) + "\n")
        self.events.flush()
        if self.tb:
            self.tb.add_text("events", json.dumps(rec), step)
        log.info(f"{kind} at step {step}" + "".join(f" {k}={v:.3g}" if isinstance(v, float) else f" {k}={v}"
                                                   for k, v in fields.items()))

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.events.close()
            if self.tb:
                self.tb.close()


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records of steps after `last_step`: after a crash the steps since the last checkpoint are
    trained again, and metrics.jsonl keeps exactly one record per step."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a torn last line from a killed writer
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
