"""The training loop (loop.py) and what it reports (metrics.py)."""
from .loop import TrainResult, lr_at, train

__all__ = ["train", "lr_at", "TrainResult"]
