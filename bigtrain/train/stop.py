"""Stopping early and coming back: signal -> checkpoint at the next step boundary -> requeue -> resume.

Signals (recorded by a handler; acted on at a step boundary, where all ranks agree through the step's one
all-reduce, see loop.py):
- SIGUSR1 / SIGUSR2: the job's time limit is near (`--signal=USR1@N` in bigtrain's sbatch files,
  `USR2` from submitit). bigtrain saves, then rank 0 requeues the job itself (`scontrol requeue`) while
  SLURM_RESTART_COUNT < launch.max_requeues.
- SIGTERM: SLURM is ending the job (preemption, `scontrol requeue`, `scancel`): bigtrain saves if it can
  within SLURM's KillWait and exits; requeueing, if any, is SLURM's.

A run that stopped early exits with EXIT_REQUEUE (75, EX_TEMPFAIL), so batch scripts can tell "come back
later" from success (0) and from errors (1, 2), which are never requeued. A hung run, or one that lost a rank
without an error of its own (killed, its node gone), exits with 124 and requeues itself (watchdog.py).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

from ..errors import BigtrainError

log = logging.getLogger("bigtrain")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: the run checkpointed and stopped early; it comes back when requeued

TIME_LIMIT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = TIME_LIMIT_SIGNALS + (signal.SIGTERM,)


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def check_restarts(max_requeues: int) -> None:
    """Refuse to run again after more requeues than allowed (a job stuck in a preempt/requeue loop)."""
    n = restart_count()
    if n > max_requeues:
        raise BigtrainError(f"SLURM job {os.environ.get('SLURM_JOB_ID')} was requeued {n} times, more than "
                            f"launch.max_requeues={max_requeues}: not resuming (raise launch.max_requeues to go on)")


def scontrol_requeue(job: str) -> str | None:
    """`scontrol requeue JOB` (after a time-limit signal, or a hang: watchdog.py); None when it worked, else why
    not (scontrol's own message)."""
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return (proc.stderr.strip() or f"exit status {proc.returncode}") if proc.returncode else None


class StopRequest:
    def __init__(self, signals=STOP_SIGNALS):
        self.signal = 0
        self.reason = ""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = self.signal or signum

    def agree(self, signum: int) -> bool:
        """Adopt the signal the ranks agreed on (the largest any rank received; 0 = none). True when stopping."""
        if signum:
            self.signal = signum
            self.reason = signal.Signals(signum).name
        return bool(signum)

    def requeue(self, max_requeues: int, rank: int) -> str:
        """After a time-limit signal, once the checkpoint is committed: rank 0 requeues the SLURM job.
        Returns what was done (for the run's events)."""
        if self.signal not in TIME_LIMIT_SIGNALS or "SLURM_JOB_ID" not in os.environ:
            return "none"
        if restart_count() >= max_requeues:
            return f"not requeued: {restart_count()} requeues already (launch.max_requeues={max_requeues})"
        if rank != 0:
            return "requeued by rank 0"
        job = os.environ["SLURM_JOB_ID"]
        error = scontrol_requeue(job)
        if error:
            log.error(f"scontrol requeue {job} failed: {error}")
            return f"requeue failed: {error}"
        return f"requeued job {job}"

    def restore_handlers(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
