"""Loader worker processes (`data.num_workers`): each reads a subset of its rank's lanes up to 4 steps ahead and
sends each step's rows of a lane with the lane's state after them, so the state the trainer saves is that of
what it consumed. Workers ignore the job's signals (the trainer stops them itself); a worker that dies or fails
is an error in the trainer, with the worker's traceback. A worker ends when its trainer is gone and
dumps its stacks to stderr on SIGQUIT (the hang watchdog asks before it ends the run).
"""
from __future__ import annotations

import faulthandler
import queue
import signal
import traceback

from ..errors import BigtrainError
from .order import produce


def worker(spec, lanes, states, a, q, stop):
    # SLURM signals every process of the job step (time limit, preemption): the trainer acts on them and
    # stops its workers itself; a worker killed by one would end the run without its checkpoint
    for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    _die_with_parent()
    faulthandler.register(signal.SIGQUIT, all_threads=True)  # the trainer's hang watchdog asks for our stacks
    try:
        for msg in produce(spec, lanes, states, a):
            while not stop.is_set():
                try:
                    q.put(msg, timeout=0.2)
                    break
                except queue.Full:
                    pass
            else:
                q.cancel_join_thread()  # stopping: what is still queued may be dropped
                return
    except BigtrainError as e:
        q.put(("error", str(e), True))
    except BaseException:
        q.put(("error", traceback.format_exc(), False))


def _die_with_parent() -> None:
    """End this worker as soon as the trainer that started it is gone, however it went (kill -9, a hang's exit):
    a worker stuck in a read would otherwise outlive the job, holding its files and its log open. (Workers are
    forkserver children, so PR_SET_PDEATHSIG would watch the fork server, not the trainer.)"""
    import multiprocessing.connection
    import os
    import threading
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)
    threading.Thread(target=watch, name="bigtrain-parent-watch", daemon=True).start()


def from_worker(q, proc):
    while True:
        try:
            msg = q.get(timeout=2)
        except queue.Empty:
            if not proc.is_alive():
                raise BigtrainError(f"data loader worker {proc.pid} died (exit code {proc.exitcode}; killed by the "
                                    "system for memory? fewer data.num_workers help)") from None
            continue
        if isinstance(msg, tuple):
            raise BigtrainError(msg[1]) if msg[2] else RuntimeError(f"data loader worker failed:\n{msg[1]}")
        yield msg
