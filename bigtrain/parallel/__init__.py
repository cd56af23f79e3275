"""Parallelism applied from outside the model: process groups (distributed.py), the DeepSpeed engine and the
supported layouts (engine.py), megatron's microbatch schedules driving the engine (schedule.py)."""
from .distributed import init_model_parallel, setup
from .engine import build_engine, check_layout
from .schedule import forward_backward, train_step

__all__ = ["setup", "init_model_parallel", "build_engine", "check_layout", "forward_backward", "train_step"]
