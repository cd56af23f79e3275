"""Evaluation as a callback: every `train.eval_interval` steps, each held-out set of `data.validation` is read
from its start for `train.eval_batches` global batches, and that step's record gets `val/<name>/loss` (the mean
token loss: every batch holds the same number of tokens, so the mean over batches is token-weighted; all-reduced
over data-parallel ranks) and `val/<name>/ppl` (its exponential) for each set, plus `val_loss`, the first set's
loss. Skipped when the run is stopping (a time-limit signal wants its checkpoint first).

Evaluation never perturbs training: it runs forward only under no_grad in eval mode (dropout off), draws from its
own readers (the training stream's position is untouched) and consumes no random numbers.
"""
from __future__ import annotations

from ..eval.perplexity import evaluate, metrics_of
from .callbacks import Callback


class Evaluation(Callback):
    def __init__(self, cfg, valid: dict):
        self.cfg, self.valid = cfg, valid  # {name: ValidationSource}

    def after_step(self, trainer, record):
        interval = self.cfg.train.eval_interval
        if not self.valid or not interval or not record["applied"] or trainer.step % interval or trainer.stopping:
            return
        with trainer.watchdog.phase("evaluation"):  # the in-loop samples (on_evaluation) included
            results = metrics_of({name: evaluate(trainer.engine, v, self.cfg) for name, v in self.valid.items()})
            record.update(results)
            trainer.callbacks.on_evaluation(trainer, results)
