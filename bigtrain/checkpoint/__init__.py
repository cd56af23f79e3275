"""Sharded, atomic, asynchronous checkpoints that load into any parallel layout
(store.py: the format, its reader and writers; state.py: DeepSpeed state <-> full tensors; manager.py:
save/restore during training). Exports are imported lazily: the format needs neither DeepSpeed nor megatron."""
import importlib

_EXPORTS = {"Checkpointer": "manager", "load_weights": "restore",
            "CheckpointError": "store", "Reader": "store", "resolve": "store", "validate": "store"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
