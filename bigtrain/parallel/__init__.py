"""Parallelism applied from outside the model: who this process is (env.py, no torch), process groups
(distributed.py), the DeepSpeed engine and the supported layouts (engine.py), megatron's microbatch schedules
driving the engine (schedule.py), and DeepSpeed's private internals, fenced in one module (deepspeed_fence.py).

Exports are imported lazily, so `bigtrain.parallel.env` loads without torch."""
import importlib

_EXPORTS = {
    "setup": "distributed", "init_model_parallel": "distributed", "on_rank0": "distributed",
    "build_engine": "engine", "check_layout": "plan",
    "forward_backward": "schedule", "train_step": "schedule", "optimizer_step": "schedule",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
