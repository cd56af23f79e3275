"""Shims that let megatron-core 0.16 (and DeepSpeed) run on a CPU-only torch build.

megatron-core assumes CUDA in a few places that matter even for CPU runs: buffers allocated on
`torch.cuda.current_device()`, a CUDA-state-backed RNG tracker, `device="cuda"` scalars in the
pipeline schedules, unconditional `torch.cuda.synchronize()`, and `.cuda()` on the tied embedding
with pipeline parallelism. `apply()` redirects each of these to the CPU. It is only ever called when
no GPU is present (see `bigtrain.parallel.distributed.setup`), and is idempotent.
"""
import types

import torch

_applied = False
MEGATRON_TESTED = ((0, 16, 1), (0, 17, 0))  # megatron-core versions [from, to) these shims were written against


def check_megatron() -> None:
    from megatron.core.package_info import __version__

    from ..errors import BigtrainError
    lo, hi = MEGATRON_TESTED
    try:
        version = tuple(int(x) for x in __version__.split(".")[:3])
    except ValueError:
        version = (-1,)
    if not lo <= version < hi:
        raise BigtrainError(f"megatron-core {__version__} is installed; bigtrain is tested with >=0.16.1,<0.17 "
                            "(pip install 'megatron-core>=0.16.1,<0.17')")


def apply() -> None:
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _applied = True
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    _patch_schedules()
    _patch_rng_tracker()
    from . import deepspeed_fence
    deepspeed_fence.skip_shm_build()


def _patch_schedules() -> None:
    """The schedules build `torch.zeros(..., device="cuda")` for token counts: give them a torch
    namespace whose zeros() lands on the CPU."""
    import megatron.core.pipeline_parallel.schedules as schedules

    shim = types.ModuleType("torch_on_cpu")
    shim.__dict__.update(torch.__dict__)
    zeros = torch.zeros

    def cpu_zeros(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return zeros(*args, **kwargs)

    shim.zeros = cpu_zeros
    schedules.torch = shim


def _patch_rng_tracker() -> None:
    """megatron's model-parallel RNG tracker keeps CUDA generator states; keep CPU ones instead."""
    from megatron.core.tensor_parallel import random as R

    R._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    R._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    class CPURNGStatesTracker(R.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    R.CudaRNGStatesTracker = CPURNGStatesTracker
    R._CUDA_RNG_STATE_TRACKER = None
    R._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


