"""One run per run directory: an exclusive lock held by the run's rank 0 for as long as it trains.

`RUN/.lock` is locked with `flock` (the kernel releases it when the holder dies, kill -9 included, so a dead
run never blocks its resume or its SLURM requeue) and holds a JSON record of the holder (host, pid, SLURM job
id and restart, start time, command) for the one-line refusal a second run gets:

    bigtrain: error: run directory runs/x is in use by another bigtrain run: host n1, pid 4242, SLURM job 77
    (restart 0), since 2026-12-02 11:00:00 (lock file runs/x/.lock); wait for it or use another run.dir

What it needs of a shared file system: `flock` that works across nodes (NFSv4, GPFS, BeeGFS, CephFS, Lustre
mounted with `-o flock`). Where `flock` is node-local (Lustre `-o localflock`) only runs on the same node are
kept apart; where it is not supported at all the run goes on with a warning and no protection. A node that
is lost while holding the lock holds it until the file server's lease expires (NFSv4: about 90 s); a requeued
incarnation of the same SLURM job waits for that (up to STALE_WAIT_S) instead of refusing.

The lock is re-entrant within a process (the command line takes it before the heavy imports, so that a
second run is refused within a second; `train()` takes it again).
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

from ..errors import BigtrainError

log = logging.getLogger("bigtrain")

LOCK_FILE = ".lock"
STALE_WAIT_S = 120.0   # how long a requeued incarnation of a SLURM job waits for its predecessor's lock

_held: dict[str, list] = {}  # realpath of the run dir -> [fd, count]


def _holder() -> dict:
    e = os.environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": e.get("SLURM_JOB_ID"),
            "slurm_restart": int(e.get("SLURM_RESTART_COUNT", "0") or 0),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}


def _describe(h: dict) -> str:
    job = f", SLURM job {h['slurm_job_id']} (restart {h.get('slurm_restart', 0)})" if h.get("slurm_job_id") else ""
    return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}{job}, since {h.get('since', '?')}"


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 1 << 16).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _earlier_incarnation(h: dict) -> bool:
    """The holder is this SLURM job before a requeue: it cannot still be running."""
    job = os.environ.get("SLURM_JOB_ID")
    me = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return bool(job) and h.get("slurm_job_id") == job and int(h.get("slurm_restart") or 0) < me


def acquire(run_dir: str) -> None:
    """Take the run directory's lock (or take it once more); BigtrainError naming the holder when another run
    has it, or when the directory cannot be created."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise BigtrainError(f"run directory {run_dir}: cannot create it ({e.strerror})") from None
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key][1] += 1
        return
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise BigtrainError(f"run directory {run_dir}: cannot write its lock file {path} ({e.strerror})") from None
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _read(fd)
            if _earlier_incarnation(holder):
                deadline = deadline or time.monotonic() + STALE_WAIT_S
                if time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                log.warning(f"{path}: the lock of this job's earlier incarnation ({_describe(holder)}) was not "
                            f"released in {STALE_WAIT_S:.0f} s (a lost node); taking the run directory over")
                break
            os.close(fd)
            raise BigtrainError(f"run directory {run_dir} is in use by another bigtrain run: {_describe(holder)} "
                                f"(lock file {path}); wait for it or use another run.dir") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise BigtrainError(f"run directory {run_dir}: cannot lock {path} ({e.strerror})") from None
            log.warning(f"{path}: this file system does not support flock ({e.strerror}): nothing keeps a second "
                        "run out of this run directory")
            break
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_holder()) + "\n").encode())
    except OSError as e:
        os.close(fd)
        raise BigtrainError(f"run directory {run_dir}: cannot write its lock file {path} ({e.strerror})") from None
    _held[key] = [fd, 1]


def release(run_dir: str) -> None:
    """Give the lock back (the last of this process's holds closes it). The file stays: removing it could let
    a waiting process lock an unlinked inode while a third creates a new one."""
    key = os.path.realpath(run_dir)
    held = _held.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _held[key]
        os.close(held[0])


class RunLock:
    """`with RunLock(run_dir):` -- acquire() on entry, release() on exit."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __enter__(self):
        acquire(self.run_dir)
        return self

    def __exit__(self, *exc):
        release(self.run_dir)
        return False
