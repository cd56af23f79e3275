"""The learning-rate schedule: linear warmup, then cosine decay to train.min_lr, a function of the optimizer step
(a skipped step does not move it)."""
from __future__ import annotations

import math

from ..config import Config


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for the optimizer step with 0-based index `step`: linear warmup, cosine decay to min_lr."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay = t.decay_steps or max(t.steps - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / decay, 1.0)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
