"""Sharded, atomic, asynchronous checkpoints that load into any parallel layout
(store.py: the format; state.py: DeepSpeed state <-> full tensors; manager.py: save/restore)."""
from .manager import Checkpointer
from .store import CheckpointError, Reader, resolve, validate

__all__ = ["Checkpointer", "CheckpointError", "Reader", "resolve", "validate"]
