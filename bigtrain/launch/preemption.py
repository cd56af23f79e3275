"""Stop requests: a signal asks the run to checkpoint at the next step boundary and stop.

SLURM sends SIGUSR1 (`--signal=USR1@N`, bigtrain's sbatch files and `bigtrain submit`) before a time limit,
and preemption or `scancel` sends SIGTERM. The handler only records the signal; at each step boundary
all ranks agree (one all-reduce) so that they stop at the same step.
"""
from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger("bigtrain")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self, signals=STOP_SIGNALS):
        self.signal: int = 0
        self.reason = ""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def requested(self) -> bool:
        """Collective: True on every rank once any rank has received a stop signal."""
        flag = torch.tensor([self.signal], dtype=torch.int64,
                            device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.reason = signal.Signals(int(flag.item())).name
            return True
        return False

    def restore_handlers(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
