"""The training loop (loop.py), its seams (callbacks.py) and what plugs into them: the guards against
non-finite steps and loss spikes (guard.py), evaluation, fault injection; what it reports (metrics.py, sinks.py);
the stop/requeue protocol (stop.py) and the run directory's lock (lock.py).

Exports are imported lazily: `bigtrain.train.lock` and `bigtrain.train.stop` load without torch."""
import importlib

_EXPORTS = {"train": "loop", "lr_at": "lr", "TrainResult": "loop", "Trainer": "loop",
            "Callback": "callbacks", "EXIT_REQUEUE": "stop"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
