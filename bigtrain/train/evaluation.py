"""Evaluation as a callback: every `train.eval_interval` steps, the mean token loss over `train.eval_batches`
global batches from the start of `data.validation`, added to that step's record (`val_loss`). Skipped when the
run is stopping (a time-limit signal wants its checkpoint first)."""
from __future__ import annotations

import torch

from ..parallel import forward_backward
from .callbacks import Callback


def evaluate(engine, valid, cfg) -> float:
    """Mean token loss over `train.eval_batches` global batches from the start of the validation data."""
    engine.eval()
    with torch.no_grad():
        losses = [forward_backward(engine, batch.to(engine.device), cfg, forward_only=True)
                  for batch in valid.batches(cfg.train.eval_batches)]
    engine.train()
    return sum(losses) / len(losses)


class Evaluation(Callback):
    def __init__(self, cfg, valid):
        self.cfg, self.valid = cfg, valid

    def after_step(self, trainer, record):
        interval = self.cfg.train.eval_interval
        if self.valid is None or not interval or not record["applied"] or trainer.step % interval or trainer.stopping:
            return
        results = {"val_loss": evaluate(trainer.engine, self.valid, self.cfg)}
        record.update(results)
        trainer.callbacks.on_evaluation(trainer, results)
