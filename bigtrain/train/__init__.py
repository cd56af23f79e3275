"""The training loop (loop.py) and what it reports (metrics.py)."""
from .loop import lr_at, train

__all__ = ["train", "lr_at"]
