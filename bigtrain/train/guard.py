"""What keeps a run from going bad silently (callbacks on the loop's seams, see callbacks.py).

- `NonFiniteGuard`: before the optimizer step, a step whose loss or global gradient norm is not finite is
  vetoed (every rank agrees in the step's one all-reduce): nothing changes, the batch is consumed, the step is
  tried again with the next batch. `guard.nonfinite=stop` ends the run instead; `guard.max_consecutive_skips`
  skips in a row end it too, with the last good checkpoint intact.
- `SpikeDetector`: a step whose loss or gradient norm exceeds mean + k sigma of the last normal steps is a
  spike (an event). Spikes and skipped steps are anomalies; `guard.rewind_after` of them within
  `guard.rewind_window` batches ask the trainer to rewind (PaLM's recipe): back to the newest healthy checkpoint
  from before the first of them, skipping every batch drawn since.
- `SkippedBatches`: the batches a rewind skipped, in RUN/skipped_batches.json (this module is its only writer),
  so that a restart or a requeue from an older checkpoint skips them too, and the rewinds count toward
  `guard.max_rewinds` over the life of the run.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import time
from collections import deque

from ..atomic import write_json
from ..config.schema import GuardConfig
from ..errors import BigtrainError
from .callbacks import Callback

SKIPPED_FILE = "skipped_batches.json"
SKIPPED_FORMAT = "bigtrain-skipped-batches"


class NonFiniteGuard(Callback):
    def __init__(self, g: GuardConfig):
        self.g = g
        self.consecutive = 0
        self.first = 0

    def before_optimizer_step(self, trainer, loss, grad_norm):
        bad = [f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
               if not math.isfinite(value)]
        return "non-finite " + " and ".join(bad) if bad else True

    def after_step(self, trainer, record):
        if record["applied"]:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.consecutive == 1:
            self.first = record["step"]  # every skip of a row tries the same step
        if self.g.nonfinite == "stop" and record["skip_reason"].startswith("non-finite"):
            trainer.fail(f"step {record['step']} (batch {record['batch']}): {record['skip_reason']}; stopping "
                         f"(guard.nonfinite=stop)", unwell_since=self.first)
        elif self.consecutive >= self.g.max_consecutive_skips:
            trainer.fail(f"{self.consecutive} steps in a row were skipped (last at step {record['step']}, batch "
                         f"{record['batch']}: {record['skip_reason']}), guard.max_consecutive_skips="
                         f"{self.g.max_consecutive_skips}: stopping", unwell_since=self.first)


class SpikeDetector(Callback):
    """Rolling mean and standard deviation of the loss and gradient norm over the last `spike_window` normal
    steps; its window travels in checkpoints, so a resumed or rewound run keeps detecting from step one."""

    METRICS = ("loss", "grad_norm")

    def __init__(self, g: GuardConfig):
        self.g = g
        self.window: deque = deque(maxlen=g.spike_window)
        self.anomalies: deque = deque()  # (batch, step) of recent spikes and skipped steps

    def state_dict(self):
        return {"window": [list(w) for w in self.window]}

    def load_state_dict(self, state):
        self.window = deque((tuple(w) for w in state.get("window", [])), maxlen=self.g.spike_window)
        self.anomalies.clear()

    def spiked(self, record) -> list[str]:
        if not self.g.spike_sigmas or len(self.window) < max(self.g.spike_warmup, 2):
            return []
        out = []
        for i, name in enumerate(self.METRICS):
            if name not in self.g.spike_metrics:
                continue
            values = [w[i] for w in self.window]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            limit = mean + self.g.spike_sigmas * max(std, 0.01 * abs(mean))
            if record[name] > limit:
                out.append(f"{name} {record[name]:.4g} > {limit:.4g} (mean {mean:.4g}, std {std:.3g} of the last "
                           f"{len(values)} steps)")
        return out

    def after_step(self, trainer, record):
        if record["applied"]:
            spikes = self.spiked(record)
            if spikes:
                trainer.note_anomaly("spike")
                trainer.metrics.event("spike", record["step"], batch=record["batch"], loss=record["loss"],
                                      grad_norm=record["grad_norm"], why="; ".join(spikes))
            else:
                self.window.append(tuple(float(record[m]) for m in self.METRICS))
                return
        self.anomalies.append((record["batch"], record["step"]))
        while self.anomalies and self.anomalies[0][0] <= record["batch"] - self.g.rewind_window:
            self.anomalies.popleft()
        if self.g.rewind_after and len(self.anomalies) >= self.g.rewind_after:
            first = self.anomalies[0]
            trainer.request_rewind(before_step=first[1], reason=f"{len(self.anomalies)} anomalies (spikes or skipped "
                                   f"steps) within {self.g.rewind_window} batches, the first at step {first[1]} "
                                   f"(batch {first[0]})")
            self.anomalies.clear()


class SkippedBatches:
    """The global batch indices the run must never train on (ranges [lo, hi)), and its rewinds."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, SKIPPED_FILE)
        self.ranges: list[list[int]] = []
        self.rewinds: list[dict] = []
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    data = json.load(f)
                if data.get("format") != SKIPPED_FORMAT:
                    raise ValueError(f"format {data.get('format')!r}, expected {SKIPPED_FORMAT!r}")
                self.ranges = sorted([int(a), int(b)] for a, b in data["ranges"])
                self.rewinds = list(data["rewinds"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise BigtrainError(f"{self.path}: unreadable ({e}); it lists the batches this run must skip: "
                                    "repair or remove it") from None
        self._starts = [a for a, _ in self.ranges]

    def __contains__(self, batch: int) -> bool:
        i = bisect.bisect_right(self._starts, batch) - 1
        return i >= 0 and batch < self.ranges[i][1]

    def count(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def add(self, lo: int, hi: int, rewind: dict) -> None:
        """Record a rewind that skips batches [lo, hi) (every rank keeps the list; rank 0 then `save()`s it)."""
        self.ranges = sorted(self.ranges + [[lo, hi]])
        self._starts = [a for a, _ in self.ranges]
        self.rewinds.append({**rewind, "batches": [lo, hi], "time": time.time()})

    def save(self) -> None:
        write_json(self.path, {"format": SKIPPED_FORMAT, "ranges": self.ranges, "rewinds": self.rewinds})
