"""Fault injection (`debug.faults`): real faults in the real training step, to try the guards on a live run.

Each fault hits the step that trains global batch `batch`, on global rank `rank`, through hooks placed on the
model from outside (nothing in the model or the loop knows of them):
- `nan_loss`: a forward hook on the output layer makes this rank's logits NaN (so its loss and gradients);
- `spike`: the same hook multiplies the logits by `value` (a loss and gradient spike);
- `inf_grad`: a gradient hook puts inf into one element of the first parameter's gradient on this rank;
- `error`: a forward pre-hook raises an exception on this rank (an exception on one rank of many);
- `hang`: the pre-hook sleeps `value` seconds (a rank stuck inside a step);
- `stop`: the pre-hook stops the process (SIGSTOP: a frozen rank that can do nothing, not even dump its stack);
- `kill`: the pre-hook kills the process (SIGKILL: a rank gone without a word, like a node lost or the OOM killer);
- `slow`: from batch `batch` on, the pre-hook computes for `value` extra seconds in each forward (a straggler).
A fault with `restart` >= 0 is injected only in the run with that SLURM_RESTART_COUNT.
"""
from __future__ import annotations

import math
import os
import signal
import time

import torch
import torch.distributed as dist

from ..errors import BigtrainError
from .callbacks import Callback
from .stop import restart_count


class FaultInjection(Callback):
    def __init__(self, faults, rank: int):
        self.faults = [f for f in faults if f.rank == rank and f.restart in (-1, restart_count())]
        self.rank = rank
        self.trainer = None
        self._fired: set = set()

    def _active(self, kind: str):
        t = self.trainer
        return next((f for f in self.faults if f.kind == kind and t is not None and
                     (f.batch <= t.batch_index if kind == "slow" else f.batch == t.batch_index)), None)

    def on_start(self, trainer):
        self.trainer = trainer
        model = trainer.engine.module
        kinds = {f.kind for f in self.faults}
        head = getattr(model, "output_layer", None)
        error = None
        if kinds & {"nan_loss", "spike"} and head is None:
            error = (f"debug.faults: {'/'.join(sorted(kinds & {'nan_loss', 'spike'}))} on rank {self.rank}, which "
                     "holds no output layer (not a last pipeline stage)")
        if trainer.cfg.debug.faults:  # every rank learns of a bad fault spec (one rank raising alone would hang)
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            if any(errors):
                raise BigtrainError(next(e for e in errors if e))
        if kinds & {"nan_loss", "spike"}:
            head.register_forward_hook(self._logits)
        if "inf_grad" in kinds:
            param = next(p for p in model.parameters() if p.requires_grad)
            param.register_hook(self._grad)
        if kinds & {"error", "hang", "stop", "kill", "slow"}:
            model.register_forward_pre_hook(self._error)

    def _logits(self, module, args, output):
        nan, spike = self._active("nan_loss"), self._active("spike")
        if not (nan or spike):
            return None
        logits, bias = output if isinstance(output, tuple) else (output, None)
        logits = logits * (math.nan if nan else spike.value)
        return (logits, bias) if isinstance(output, tuple) else logits

    def _grad(self, grad):
        if not self._active("inf_grad"):
            return None
        grad = grad.clone()
        grad.view(-1)[0] = math.inf
        return grad

    def _error(self, module, args):
        if self._active("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        for kind in ("hang", "stop"):  # once, not in every microbatch of the step
            if (f := self._active(kind)) is not None and id(f) not in self._fired:
                self._fired.add(id(f))
                time.sleep(f.value) if kind == "hang" else os.kill(os.getpid(), signal.SIGSTOP)
        if (f := self._active("slow")) is not None:  # real work, so that CPU time shows it
            x, end = torch.ones(64, 64), time.perf_counter() + f.value
            while time.perf_counter() < end:
                x = (x @ x).clamp_(-1, 1)
        if self._active("error"):
            raise RuntimeError(f"injected fault (debug.faults): error on rank {self.rank} at batch "
                               f"{self.trainer.batch_index}")
