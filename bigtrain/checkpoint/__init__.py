"""Sharded, atomic, asynchronous checkpoints that load into any parallel layout
(store.py: the format; state.py: DeepSpeed state <-> full tensors; manager.py: save/restore)."""
from .manager import Checkpointer, load_weights
from .store import CheckpointError, Reader, resolve, validate

__all__ = ["Checkpointer", "load_weights", "CheckpointError", "Reader", "resolve", "validate"]
