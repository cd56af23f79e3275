"""The one interface between training and data: a `BatchSource`.

The trainer asks for one global batch per optimizer step and gets this data-parallel rank's share of it.
The global sample sequence is a function of the data config and seed alone; which samples a rank gets
depends on (dp_rank, dp_size), so a run restored with another data-parallel size continues the same
global sequence.
"""
from __future__ import annotations

from typing import Protocol

import torch


class BatchSource(Protocol):
    def next_batch(self) -> torch.Tensor:
        """This rank's samples of the next global batch: int64 token ids [global_batch // dp_size, seq_len + 1]
        (inputs are [:, :-1], labels [:, 1:]). Called once per optimizer step by every rank."""
        ...

    def state_dict(self) -> dict:
        """The position of the whole global stream (all ranks' parts), JSON-serialisable and identical on every
        rank. Collective over the data-parallel group: every rank calls it at the same step."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` taken under any data-parallel size."""
        ...

    def close(self) -> None:
        """Stop background readers."""
        ...
