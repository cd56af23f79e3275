"""Distillation as a plug-in of the loop (`distill.teacher` set): a Callback that loads the frozen teacher at the
start (bigtrain/distill), records its identity in each checkpoint, and adds `ce` and `kd` (this step's global
token means: `train/ce`, `train/kd`) to each step's record; and the loop's objective, the per-token loss

    (1 - alpha) * CE + alpha * s * KL(p_teacher,T || p_student,T),  s = T^2 (distill.scale_by_t2) or 1

of every microbatch, the KL computed on tensor-parallel logit shards (bigtrain/distill/kl.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from ..distill import load_teacher, vocab_parallel_kl
from ..errors import BigtrainError
from .callbacks import Callback


class Distillation(Callback):
    def __init__(self, cfg):
        self.cfg = cfg  # (pipeline parallelism is refused with distillation by the config check)
        self.teacher = None
        self.identity: dict | None = None   # recorded in checkpoints; a resume reloads exactly this teacher
        self._sums = None                   # [ce sum, kd sum, tokens] of this step's microbatches on this rank

    def __call__(self, call, tokens: torch.Tensor) -> torch.Tensor:
        """The objective: per-token loss [b, s] of the student (`call`: the engine or the bare model) on token ids
        [b, s+1]; the teacher runs its forward on the same inputs."""
        d = self.cfg.distill
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        student = call(inputs, None, None)                      # [b, s, vocab / TP]
        with torch.no_grad():
            teacher = self.teacher(inputs, None, None)
        ce = tensor_parallel.vocab_parallel_cross_entropy(student.transpose(0, 1).contiguous(),
                                                         labels.transpose(0, 1).contiguous()).transpose(0, 1)
        group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
        kd = vocab_parallel_kl(student, teacher, d.temperature, group)
        if self._sums is not None:
            self._sums += torch.stack([ce.detach().double().sum(), kd.detach().double().sum(),
                                       torch.tensor(float(ce.numel()), dtype=torch.float64)]).to(self._sums)
        scale = d.temperature ** 2 if d.scale_by_t2 else 1.0
        return (1 - d.alpha) * ce.float() + (d.alpha * scale) * kd

    def on_start(self, trainer):
        self.teacher, self.identity, _ = load_teacher(self.cfg, trainer.device, self.identity)
        trainer.objective = self

    def before_step(self, trainer):
        self._sums = torch.zeros(3, dtype=torch.float64)

    def after_step(self, trainer, record):
        sums = self._sums if ps.get_tensor_model_parallel_rank() == 0 else torch.zeros(3, dtype=torch.float64)
        dist.all_reduce(sums)  # one contribution per data-parallel replica (TP rank 0; PP is refused)
        ce, kd, n = sums.tolist()
        record.update(ce=ce / max(n, 1), kd=kd / max(n, 1))
        self._sums = None

    def state_dict(self):
        return {"teacher": self.identity}

    def load_state_dict(self, state):
        recorded = state.get("teacher")
        if recorded and self.teacher is not None and recorded != self.identity:
            raise BigtrainError(f"distill.teacher: the checkpoint was trained with {recorded['path']} (step "
                                f"{recorded['step']}), this run holds {self.identity['path']}")
        self.identity = recorded or self.identity

    def on_close(self, trainer, error):
        self.teacher = None
