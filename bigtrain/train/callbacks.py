"""The seams of the training loop: features plug in here instead of growing the loop.

A `Callback` overrides the hooks it needs; the loop (loop.py) calls every callback's hook in order at fixed
points. Every hook runs on every rank with the same arguments (losses and norms are global values), so a hook
may run collectives -- as long as it does so on every rank alike.

    on_start(trainer)                          after restore: trainer.step, trainer.resumed are known
    before_step(trainer)                       before the batch is drawn (trainer.next_batch_index: its index)
    before_optimizer_step(trainer, loss, norm) gradients reduced and measured, AdamW not yet run: return False
                                               or a reason (a string) to veto the update (the step is skipped:
                                               nothing changes, the batch is consumed); all ranks agree in the
                                               step's one all-reduce
    after_step(trainer, record)                after the update (or the skip): `record` is the step's metrics
                                               (record["applied"] tells which); add entries to it, or ask the
                                               trainer for a checkpoint / rewind / stop
    on_evaluation(trainer, results)            after an evaluation, with its metrics
    on_checkpoint(trainer, step, error)        a save was committed (error None) or failed (error: why)
    on_close(trainer, error)                   the run ends (error: the exception, or None)

Requests a hook can make: `trainer.request_checkpoint(reason)`, `trainer.request_rewind(reason)`,
`trainer.fail(message)` (the run stops with that one-line error, on every rank).
"""
from __future__ import annotations


class Callback:
    """Base class: every hook does nothing."""

    def on_start(self, trainer) -> None:
        pass

    def before_step(self, trainer) -> None:
        pass

    def before_optimizer_step(self, trainer, loss: float, grad_norm: float) -> bool:
        return True

    def after_step(self, trainer, record: dict) -> None:
        pass

    def on_evaluation(self, trainer, results: dict) -> None:
        pass

    def on_checkpoint(self, trainer, step: int, error: str | None) -> None:
        pass

    def on_close(self, trainer, error: BaseException | None) -> None:
        pass

    # Trainer state a callback wants in each checkpoint (JSON) and back on resume or rewind.
    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


class Callbacks(Callback):
    """Several callbacks called in order, as one (but for before_optimizer_step: the loop asks each callback
    itself, to name the ones that veto)."""

    def __init__(self, callbacks):
        self.items = list(callbacks)

    def on_start(self, trainer):
        for c in self.items:
            c.on_start(trainer)

    def before_step(self, trainer):
        for c in self.items:
            c.before_step(trainer)

    def after_step(self, trainer, record):
        for c in self.items:
            c.after_step(trainer, record)

    def on_evaluation(self, trainer, results):
        for c in self.items:
            c.on_evaluation(trainer, results)

    def on_checkpoint(self, trainer, step, error):
        for c in self.items:
            c.on_checkpoint(trainer, step, error)

    def on_close(self, trainer, error):
        for c in self.items:
            c.on_close(trainer, error)

    def state_dict(self) -> dict:
        return {type(c).__name__: s for c in self.items if (s := c.state_dict()) is not None}

    def load_state_dict(self, state: dict) -> None:
        for c in self.items:
            if type(c).__name__ in state:
                c.load_state_dict(state[type(c).__name__])
