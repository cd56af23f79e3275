"""The straggler report: which rank holds the others up. Report only; it never stops a run.

Each rank measures its own time per step: the CPU time its process used during the step plus the time it waited
for its data. Time spent waiting for other ranks inside collectives is neither, so a slow rank stands out
instead of every rank showing the slowest one's step time (on GPU the CPU time is host work only: launches,
Python, the loader). Every `train.log_interval` steps the ranks' means over the interval are gathered (one
all_gather) and that step's record gets `straggler/slowest_rank`, `straggler/ratio` (its time over the median
rank's), `straggler/slowest_s` and `straggler/median_s` -- in metrics.jsonl and TensorBoard.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .callbacks import Callback


class StragglerReport(Callback):
    def __init__(self, log_interval: int):
        self.interval = max(1, log_interval)
        self.total, self.count, self._t0 = 0.0, 0, 0.0

    def before_step(self, trainer):
        self._t0 = time.process_time()

    def after_step(self, trainer, record):
        self.total += time.process_time() - self._t0 + record.get("data_seconds", 0.0)
        self.count += 1
        if not record["applied"] or trainer.step % self.interval or dist.get_world_size() == 1:
            return
        mine = torch.tensor([self.total / self.count], dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        record.update(straggler_fields([float(t) for t in every]))
        self.total, self.count = 0.0, 0


def straggler_fields(seconds: list[float]) -> dict:
    """The report's entries from each rank's seconds per step (index = rank)."""
    slowest = max(range(len(seconds)), key=seconds.__getitem__)
    ordered = sorted(seconds)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return {"straggler/slowest_rank": slowest, "straggler/ratio": seconds[slowest] / median if median > 0 else 1.0,
            "straggler/slowest_s": seconds[slowest], "straggler/median_s": median}
