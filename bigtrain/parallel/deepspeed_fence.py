"""Every use of DeepSpeed's private internals, in one place, checked against the tested version at start-up.

bigtrain drives DeepSpeed's engine through its public API (`deepspeed.initialize`, `engine.step`,
`deepspeed.utils.safe_get_full_*`) except for what that API does not offer; each such use is a function here,
with what it relies on. `check_version()` refuses a DeepSpeed outside `TESTED` with one line, before any work.

- the gradient norm DeepSpeed measured before its optimizer step, and whether it skipped the step itself;
- a veto on the optimizer step (`StepGate`), placed on the torch AdamW that DeepSpeed drives;
- the fp32 ZeRO-0 clip (`engine.clip_fp32_gradients`) replaced by a megatron-aware one;
- resetting ZeRO's per-backward bookkeeping (1F1B runs several backwards in a row);
- the locally accumulated gradient of a parameter (tied embeddings across pipeline stages);
- the tensors AdamW keeps state for, each parameter's fp32 fragment, and relinking moments to parameters;
- forgetting DeepSpeed's cached process groups and ZeRO-3's model stack (a new layout in the same process);
- the tensors of the training state, reached through the optimizer's buffers (`bigtrain plan`'s figures are checked
  against them);
- megatron's layer recompute routed through DeepSpeed's activation checkpointing (partitioned across tensor-parallel
  ranks, optionally kept in host memory): `route_recompute`.
"""
from __future__ import annotations

import math

import torch

TESTED = ("0.19.8",)  # DeepSpeed versions these internals were read and tested against (setup.py pins it)


def check_version() -> None:
    import deepspeed

    from ..errors import BigtrainError
    if deepspeed.__version__ not in TESTED:
        raise BigtrainError(f"DeepSpeed {deepspeed.__version__} is installed; bigtrain uses DeepSpeed internals tested "
                            f"with {', '.join(TESTED)} only (pip install deepspeed=={TESTED[-1]})")


def uses_zero_optimizer(engine) -> bool:
    """True when DeepSpeed wraps the optimizer (ZeRO 1-3, or bf16); False for plain fp32 ZeRO-0."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    return isinstance(engine.optimizer, ZeROOptimizer)


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW that DeepSpeed drives (wrapped by ZeRO / bf16, or used directly)."""
    return engine.optimizer.optimizer if uses_zero_optimizer(engine) else engine.optimizer


# --- the optimizer step ----------------------------------------------------------------------------------------

def measured_grad_norm(engine) -> float:
    """The global gradient norm DeepSpeed computed in the step now running (before clipping). ZeRO 1-3 and the
    bf16 optimizer keep it in `optimizer._global_grad_norm`; bigtrain's fp32 ZeRO-0 clip in the engine's."""
    holder = engine.optimizer if uses_zero_optimizer(engine) else engine
    norm = getattr(holder, "_global_grad_norm", None)
    return float("nan") if norm is None else float(norm)


def skipped_by_deepspeed(engine) -> bool:
    """DeepSpeed's own overflow verdict for the last step (ZeRO 1-3 in fp32 and ZeRO-3 / the bf16 optimizer
    skip a step whose gradient norm is not finite, silently; ZeRO 1-2 in bf16 do not)."""
    return bool(getattr(engine.optimizer, "overflow", False))


class StepGate:
    """A veto on the optimizer update inside `engine.step()`. DeepSpeed reduces the gradients, measures their
    norm and clips, then calls the torch optimizer (once per parameter group or ZeRO sub-group); the gate sits on
    that call. `arm(decide)` before `engine.step()`: at the first call `decide(grad_norm)` runs (on every rank at
    the same point, so it may run collectives) and its answer holds for every call of this step. A vetoed step
    changes nothing: AdamW's moments and step count are untouched, and DeepSpeed copies the unchanged fp32
    master weights back into the model (the same values), then clears the gradients as after any step."""

    def __init__(self, engine):
        self.engine = engine
        self.optimizer = inner_optimizer(engine)
        self._real = self.optimizer.step
        self.optimizer.step = self._step  # an instance attribute shadows the class's step
        self.decide = None
        self.verdict: bool | None = None
        self.grad_norm = math.nan

    def arm(self, decide) -> None:
        self.decide, self.verdict, self.grad_norm = decide, None, math.nan

    def disarm(self) -> bool | None:
        """The verdict of the step that just ran (None: the optimizer was never called)."""
        verdict, self.decide = self.verdict, None
        return verdict

    def _step(self, *args, **kwargs):
        if self.decide is None:
            return self._real(*args, **kwargs)
        if self.verdict is None:
            self.grad_norm = measured_grad_norm(self.engine)
            self.verdict = bool(self.decide(self.grad_norm))
        if self.verdict:
            return self._real(*args, **kwargs)
        return None


def step_gate(engine) -> StepGate:
    gate = getattr(engine, "_bigtrain_gate", None)
    if gate is None:
        gate = engine._bigtrain_gate = StepGate(engine)
    return gate


def install_fp32_clip(engine, clip) -> None:
    """fp32 ZeRO-0 has no DeepSpeed optimizer wrapper; DeepSpeed calls `engine.clip_fp32_gradients()` after the
    data-parallel all-reduce (when gradient_clipping > 0). `clip()` returns the global norm it measured."""
    def run():
        engine._global_grad_norm = clip()
    engine.clip_fp32_gradients = run


def reset_backward_bookkeeping(optimizer) -> None:
    """ZeRO's per-backward epilogue runs only after a backward that followed a forward; megatron's 1F1B runs
    several backwards in a row, so each backward resets the flag as a forward would."""
    optimizer.clear_backward_seen_flag()


def local_grad(param) -> torch.Tensor:
    """The locally accumulated (not yet data-parallel-reduced) gradient of `param`: DeepSpeed's bf16 optimizer
    keeps it in fp32 in `_hp_grad`, ZeRO-1/2 with fp32 accumulation in `grad_accum`, else `grad`."""
    for attr in ("_hp_grad", "grad_accum", "grad"):
        g = getattr(param, attr, None)
        if g is not None:
            return g
    raise RuntimeError("tied embedding has no gradient to synchronise")


# --- optimizer state -----------------------------------------------------------------------------------------

def stepped_tensors(engine) -> list[torch.Tensor]:
    """The tensors AdamW keeps state for: DeepSpeed's flat fp32 partitions, or the parameters themselves."""
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat",   # ZeRO-3
                 "single_partition_of_fp32_groups",  # ZeRO-1/2
                 "fp32_groups_flat_partition"):      # bf16 optimizer (ZeRO-1 with bf16)
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return [p for g in opt.param_groups for p in g["params"]]


def link_moments(engine) -> None:
    """Point each parameter's ZeRO-1/2 / bf16 fragment mapping at the current AdamW state. DeepSpeed links them
    once, after the first step of the *first* parameter group, so parameters of later groups (bigtrain's
    no-weight-decay group) stay unlinked and their moments unreachable; relink all of them whenever moments are
    read or written."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def is_zero3_param(p) -> bool:
    return hasattr(p, "ds_id")


def local_fp32_fragment(p, key: str | None) -> torch.Tensor | None:
    """This DP rank's fp32 fragment of parameter `p` (master weights if key is None, else a moment)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state
    if is_zero3_param(p):
        return safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
    mapping = getattr(p, "_hp_mapping", None)  # ZeRO-1/2 and bf16: DeepSpeed's low->high precision link
    return None if mapping is None else mapping.get_hp_fragment(key)


def mark_pipeline_replica(p) -> None:
    """The last stage's copy of a tied embedding: DeepSpeed's norms skip parameters marked so."""
    p.ds_pipe_replicated = True


def forget_engines() -> None:
    """Before a new layout in the same process: DeepSpeed caches process groups in module globals of
    deepspeed.utils.groups (the world clone, ZeRO's and MoE groups, the mpu's), reset to their initial values once
    bigtrain has destroyed the groups; and ZeRO-3 keeps every model it wrapped in a module-level stack
    (parameter_offload.FWD_MODULE_STACK) and per-module lru_caches on its parameter coordinator's class, which
    keep the old engine alive."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from deepspeed.utils import groups
    parameter_offload.FWD_MODULE_STACK.clear()
    clear_method_caches(PartitionedParameterCoordinator)
    for name, empty in (("_EXPERT_PARALLEL_GROUP", {}), ("_EXPERT_PARALLEL_GROUP_RANKS", {}),
                        ("_EXPERT_DATA_PARALLEL_GROUP", {}), ("_EXPERT_DATA_PARALLEL_GROUP_RANKS", {}),
                        ("_ALL_TO_ALL_GROUP", {}), ("_WORLD_GROUP", None), ("_ZERO_PARAM_INTRA_PARALLEL_GROUP", None),
                        ("_TENSOR_MODEL_PARALLEL_GROUP", None), ("_MODEL_PARALLEL_GROUP", None),
                        ("_DATA_PARALLEL_GROUP", None)):
        if hasattr(groups, name):
            setattr(groups, name, type(empty)() if isinstance(empty, dict) else empty)


def clear_method_caches(cls) -> None:
    """Empty the functools caches on `cls`'s methods (directly decorated or wrapped once more): a cache keyed by
    `self` on a class keeps every instance alive."""
    for attr in vars(cls).values():
        for f in (attr, *(c.cell_contents for c in getattr(attr, "__closure__", None) or ())):
            if hasattr(f, "cache_clear"):
                f.cache_clear()


def skip_shm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op on first use (~70 s); gloo is enough."""
    import sys

    import deepspeed.comm.torch  # noqa: F401  (makes sure the module is loaded before patching)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


# --- what an engine holds (bigtrain plan's figures are checked against it) ----------------------------------

GRADIENT_BUFFERS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
                    "fp32_groups_gradients_flat")  # ZeRO-1/2, ZeRO-2 contiguous, ZeRO-3, bf16 optimizer


def state_tensors(engine) -> dict[str, list[torch.Tensor]]:
    """The tensors of this rank's training state, by kind: "parameters" (the model's copy; ZeRO-3: this rank's
    partition), "gradients" (the parameters' gradients, their fp32 accumulation buffers, the optimizer's flat and
    partitioned gradient buffers, the fp32 master's gradient), "optimizer" (the fp32 master weights when they are
    not the parameters themselves, AdamW's moments). Scalars (step counts, norms) are left out."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple, dict)):
            for v in value.values() if isinstance(value, dict) else value:
                yield from tensors(v)

    params = list(engine.module.parameters())
    masters = stepped_tensors(engine)
    grads = [t for p in params for a in ("grad", "_hp_grad", "grad_accum") if (t := getattr(p, a, None)) is not None]
    grads += [t for a in GRADIENT_BUFFERS for t in tensors(getattr(engine.optimizer, a, None))]
    grads += [m.grad for m in masters if m.grad is not None]
    moments = [v for st in inner_optimizer(engine).state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.numel() > 1]
    return {"parameters": [getattr(p, "ds_tensor", p) for p in params], "gradients": grads,
            "optimizer": masters + moments}


class _TensorParallelMPU:
    """The model-parallel unit DeepSpeed's activation checkpointing asks for: megatron's tensor-parallel group."""

    @staticmethod
    def get_model_parallel_rank():
        from megatron.core import parallel_state as ps
        return ps.get_tensor_model_parallel_rank()

    @staticmethod
    def get_model_parallel_world_size():
        from megatron.core import parallel_state as ps
        return ps.get_tensor_model_parallel_world_size()

    @staticmethod
    def get_model_parallel_group():
        from megatron.core import parallel_state as ps
        return ps.get_tensor_model_parallel_group()


_MEGATRON_CHECKPOINT = None


def route_recompute(partition: bool, offload: bool) -> None:
    """megatron's full recompute (TransformerBlock calls `tensor_parallel.checkpoint(fn, distribute, *inputs)`)
    through `deepspeed.checkpointing.checkpoint(fn, *inputs)`, configured to partition the saved inputs across the
    tensor-parallel ranks and/or keep them on the host; both False: megatron's own again. Relies on
    megatron.core.transformer.transformer_block looking `tensor_parallel.checkpoint` up at call time, and on
    `deepspeed.checkpointing.configure`'s module-global settings (one setting per process: the model built last)."""
    global _MEGATRON_CHECKPOINT
    import types

    from megatron.core import tensor_parallel
    from megatron.core.transformer import transformer_block
    if _MEGATRON_CHECKPOINT is None:
        _MEGATRON_CHECKPOINT = tensor_parallel
    if not (partition or offload):
        transformer_block.tensor_parallel = _MEGATRON_CHECKPOINT
        return
    import deepspeed
    deepspeed.checkpointing.configure(_TensorParallelMPU, partition_activations=partition, checkpoint_in_cpu=offload,
                                      contiguous_checkpointing=False, synchronize=False, profile=False)

    def checkpoint(function, distribute_saved_activations, hidden_states, *args):
        # only the layer input is an activation to split and move; the rest (masks, RoPE tables: no gradient) is
        # bound as it is
        return deepspeed.checkpointing.checkpoint(lambda h: function(h, *args), hidden_states)

    transformer_block.tensor_parallel = types.SimpleNamespace(**{**vars(tensor_parallel), "checkpoint": checkpoint})
