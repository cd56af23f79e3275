"""Held-out shards for evaluation: plain order (one lane, no blend), split over data-parallel ranks like
training; `batches(n)` always starts from the beginning, so every evaluation sees the same samples."""
from __future__ import annotations

import numpy as np

from ..errors import BigtrainError
from .members import check_skips
from .order import initial_lane_state, produce
from .sources import DataPlan, Source, check_data


class ValidationSource:
    """The held-out shards in plain order (one lane, no blend), split over data-parallel ranks like training;
    `batches(n)` always starts from the beginning, so every evaluation sees the same samples."""

    def __init__(self, source: Source, *, seq_len: int, vocab_size: int, global_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, max_skip_fraction: float = 0.01):
        if global_batch % dp_size:
            raise BigtrainError(f"train.global_batch_size={global_batch} is not a multiple of the data-parallel size {dp_size}")
        self.source, self.G, self.D, self.r = source, global_batch, dp_size, dp_rank
        self.sample_len, self.vocab_size, self.max_skip_fraction = seq_len + 1, vocab_size, max_skip_fraction

    def batches(self, n: int):
        import torch
        spec = dict(sources=[self.source], K=1, seed=0, D=self.D, r=self.r, G=self.G, sample_len=self.sample_len,
                    vocab_size=self.vocab_size, shuffle=False)
        producer = produce(spec, [0], {0: initial_lane_state(1)}, 0)
        try:
            for _ in range(n):
                out = np.empty((self.G // self.D, self.sample_len), np.int64)
                ((_, rows, pos, state),) = next(producer)
                out[pos] = rows
                check_skips([state], self.max_skip_fraction, state["last_bad"])
                yield torch.from_numpy(out)
        finally:
            producer.close()


def build_validation_sources(cfg, dp_rank: int = 0, dp_size: int = 1, plan: DataPlan | None = None,
                             global_batch: int | None = None) -> dict[str, ValidationSource]:
    """This rank's share of every held-out set of `data.validation`, by name (in config order)."""
    plan = plan or check_data(cfg)
    return {s.name: ValidationSource(s, seq_len=cfg.model.seq_length, vocab_size=cfg.model.vocab_size,
                                     global_batch=global_batch or cfg.train.global_batch_size, dp_rank=dp_rank,
                                     dp_size=dp_size, max_skip_fraction=cfg.data.max_skip_fraction)
            for s in plan.validation}


def build_validation_source(cfg, dp_rank: int = 0, dp_size: int = 1,
                            plan: DataPlan | None = None) -> ValidationSource | None:
    """The first held-out set of this rank, or None when data.validation is empty."""
    if not cfg.data.validation_sets():
        return None
    return next(iter(build_validation_sources(cfg, dp_rank, dp_size, plan).values()))
