"""The hang watchdog (`watchdog.*`): a run that stops making progress ends, with evidence, instead of idling to
its time limit.

Each rank times the phase it is in from a thread of its own -- start-up, step, evaluation, checkpoint -- against
that phase's budget (the step's derived from measured step times, so a slow first step is not a hang). When a
phase outlives its budget, whatever the main thread is stuck in (a collective, I/O, the data loader, a sleeping
or frozen peer):
1. every thread's stack is written to `run.dir/hangs/restart<N>-rank<R>.txt` (faulthandler);
2. the hang is a line of `run.dir/hangs/hangs.jsonl` (time, rank, phase, step, budget, restart, job);
3. under SLURM, the job requeues itself (`scontrol requeue`, one rank does it) and resumes from its last
   checkpoint -- while SLURM_RESTART_COUNT < launch.max_requeues (the counter preemptions use) and unless an
   earlier run of the job already hung at the same step in the same phase (a hang that comes back is not
   requeued forever);
4. one line `bigtrain: error: rank R: hang: ...` goes to stderr and the process exits with EXIT_HANG (124).
Under torchrun the rank also sends SIGCONT to its sibling ranks first, so that a stopped one (SIGSTOP, a
debugger) can act on torchrun's SIGTERM (srun does the same itself).

If the watchdog thread cannot run (a C extension holding the GIL), faulthandler's own C thread dumps the stacks
to stderr and exits with status 1 a grace period later (`backstop`, re-armed by the watchdog thread each second).

Collective timeouts back the watchdog up: the start-up timeout until the first step is done, then
`watchdog.collective_timeout` on every process group. A collective that times out is a hang like any other.

A collective that fails because another rank is gone is a "lost rank" and ends the same way, requeue included,
unless that rank left a note that it failed with an error of its own (`lost_rank`, `note_failure`).
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager

from ..parallel.distributed import set_collective_timeout
from .callbacks import Callback
from .stop import restart_count, scontrol_requeue

EXIT_HANG = 124  # like timeout(1): the run hung and was ended by its watchdog
HANGS = "hangs"  # run.dir/hangs: stack dumps and hangs.jsonl
RECENT_STEPS = 100
_EXPIRING = threading.Lock()  # one hang report per process

# phase -> the config key of its budget (the step's is derived when watchdog.step_timeout is 0)
BUDGET_KEYS = {"start-up": "startup_timeout", "first step": "first_step_timeout", "step": "step_timeout",
               "evaluation": "evaluation_timeout", "checkpoint": "checkpoint_timeout"}


def requeue_decision(earlier: list[dict], step: int, phase: str, restart: int, max_requeues: int,
                     in_slurm: bool) -> tuple[bool, str]:
    """Whether a job that hung at (step, phase) in its run `restart` requeues itself, and why (for the error
    line). `earlier`: the records of hangs.jsonl."""
    if not in_slurm:
        return False, "not under SLURM: not requeued"
    kind = _kind(phase)
    again = [h for h in earlier if h.get("restart", 0) < restart and h.get("step") == step
             and _kind(h.get("phase", "")) == kind]
    if again:
        return False, (f"not requeued: the job hung at step {step} in {phase} before (restart "
                       f"{again[-1]['restart']}); the hang comes back")
    if restart >= max_requeues:
        return False, f"not requeued: {restart} requeues already (launch.max_requeues={max_requeues})"
    return True, "the job requeues itself and resumes from its last checkpoint"


def _kind(phase: str) -> str:
    return "step" if phase == "first step" else phase


def read_hangs(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, HANGS, "hangs.jsonl")
    records = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:  # a line torn by a kill: the others still count
                    pass
    except OSError:
        pass
    return records


class Watchdog(Callback):
    """Per-rank phase budgets (see the module docstring). The loop enters phases through `phase()` (or the
    step hooks); `expire()` is also how a timed-out collective ends the run."""

    def __init__(self, cfg, rank: int):
        self.cfg, self.w, self.rank = cfg, cfg.watchdog, rank
        self.run_dir = cfg.run.dir
        self.step = 0
        self.recent: deque = deque(maxlen=RECENT_STEPS)
        self.read_floor = _remote_read_floor(cfg.data)
        self._steps_seen = 0
        self._state = ("start-up", self.w.startup_timeout, time.monotonic())  # (phase, budget, since)
        self._stop = threading.Event()
        self._thread = None

    # --- phases --------------------------------------------------------------------------------------------

    def start(self) -> None:
        try:  # a note of this rank's own, left by an earlier attempt with the same restart count (see lost_rank)
            os.remove(os.path.join(self.run_dir, HANGS, f"failed-restart{restart_count()}-rank{self.rank}"))
        except OSError:
            pass
        if self.w.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="bigtrain-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)  # it disarms the backstop on its way out
            self._thread = None

    def step_budget(self) -> float:
        if self.w.step_timeout:
            return self.w.step_timeout
        return max(self.w.min_step_timeout, self.read_floor, self.w.step_timeout_factor * max(self.recent))

    def enter(self, phase: str) -> None:
        if phase == "step" and not (self.recent or self.w.step_timeout):
            phase = "first step"  # no step time measured yet in this process
        budget = self.step_budget() if phase == "step" else getattr(self.w, BUDGET_KEYS[phase])
        self._state = (phase, budget, time.monotonic())

    @contextmanager
    def phase(self, name: str):
        """Time `name` against its budget; the phase before it starts afresh afterwards."""
        before = self._state[0]
        self.enter(name)
        try:
            yield
        finally:
            self.enter(before)

    # --- callback hooks ------------------------------------------------------------------------------------

    def on_start(self, trainer):
        self.step = trainer.step
        set_collective_timeout(self.w.startup_timeout)  # megatron's and DeepSpeed's groups too, until a step is done
        earlier = [h for h in read_hangs(self.run_dir) if h.get("restart") == restart_count() - 1]
        if earlier:
            h = earlier[0]
            kind = h.get("kind", "hang").replace(" ", "_")  # hang, lost_rank
            trainer.metrics.event(kind, h.get("step", 0), phase=h.get("phase"), rank=h.get("rank"),
                                  seconds=h.get("elapsed"), restart=h.get("restart"), dump=h.get("dump"))

    def before_step(self, trainer):
        self.step = trainer.step
        self.enter("step")

    def after_step(self, trainer, record):
        self._steps_seen += 1
        if self._steps_seen == 1:  # start-up is over; the first step of a process warms up: not a measure
            set_collective_timeout(self.w.collective_timeout)
        else:
            self.recent.append(record["step_seconds"])

    # --- the watching thread -------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            phase, budget, since = self._state
            left = budget - (time.monotonic() - since)
            if left <= 0:
                self.expire(phase, budget, time.monotonic() - since)
            # the backstop: faulthandler's own thread, should this one be kept from running
            faulthandler.dump_traceback_later(left + max(10.0, budget / 2), exit=True, file=sys.stderr)
            self._stop.wait(min(1.0, max(0.01, left)))
        faulthandler.cancel_dump_traceback_later()

    def expire(self, phase: str, budget: float, elapsed: float, cause: str = "", kind: str = "hang") -> None:
        """The run is hung (or lost a rank: `kind` "lost rank"): dump every thread's stack, record it, requeue
        under SLURM, say so, exit 124. Never returns (a second caller, e.g. a collective timing out while the
        thread acts, waits for the exit)."""
        if not _EXPIRING.acquire(blocking=False):
            while True:
                time.sleep(3600)
        restart, job = restart_count(), os.environ.get("SLURM_JOB_ID")
        folder = os.path.join(self.run_dir, HANGS)
        dump = os.path.join(folder, f"restart{restart}-rank{self.rank}.txt")
        key = f"watchdog.{BUDGET_KEYS.get(phase, 'collective_timeout')}"
        what = cause or f"{phase} took more than {budget:.0f} s ({key})"
        try:
            os.makedirs(folder, exist_ok=True)
            with open(dump, "w") as f:
                f.write(f"bigtrain hang: rank {self.rank} pid {os.getpid()} on {socket.gethostname()}, {what}, at "
                        f"step {self.step}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            dump = f"(not written: {e.strerror}; stacks on stderr)"
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        requeue, why = requeue_decision(read_hangs(self.run_dir), self.step, phase, restart,
                                        self.cfg.launch.max_requeues, bool(job))
        record = dict(time=time.time(), kind=kind, rank=self.rank, phase=phase, step=self.step, budget=budget,
                      elapsed=round(elapsed, 3), cause=cause, restart=restart, job=job, host=socket.gethostname(),
                      pid=os.getpid(), dump=dump, requeue=requeue)
        try:
            with open(os.path.join(folder, "hangs.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError:
            pass
        if requeue:
            why = self._requeue(folder, job, restart, why)
        workers = _end_children()
        _say(f"bigtrain: error: rank {self.rank}: {kind}: {what} at step {self.step}; stacks of every thread in "
             f"{dump}{workers}; {why}")
        _wake_local_peers()
        os._exit(EXIT_HANG)

    def collective_timed_out(self, why: str) -> None:
        """A collective outlived watchdog.collective_timeout (or the start-up one): a hang. Never returns."""
        phase, budget, since = self._state
        self.expire(phase, budget, time.monotonic() - since, cause=f"a collective timed out in {phase} ({why})")

    def lost_rank(self, why: str, grace: float = 3.0) -> None:
        """A collective failed because another rank is gone. A rank that fails by itself (an exception: a bug, a
        config or data error) leaves a note first (`note_failure`), and its error is the run's: then this returns
        and the caller ends the run with an error, not requeued. A rank gone without a note was killed (kill -9,
        the OOM killer) or lost with its node: that is handled like a hang -- stacks, record, requeue under SLURM,
        exit 124 (never returns)."""
        deadline = time.monotonic() + grace  # the failing rank's note may still be on its way
        while True:
            if self.failure_notes():
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        phase, budget, since = self._state
        self.expire(phase, budget, time.monotonic() - since, kind="lost rank",
                    cause=f"another rank is gone without an error of its own ({why})")

    def note_failure(self, error: BaseException) -> None:
        """This rank fails with an error of its own: say so where the other ranks look (see `lost_rank`)."""
        try:
            os.makedirs(os.path.join(self.run_dir, HANGS), exist_ok=True)
            with open(os.path.join(self.run_dir, HANGS, f"failed-restart{restart_count()}-rank{self.rank}"), "w") as f:
                f.write(f"{type(error).__name__}: {error}"[:2000])
        except OSError:
            pass

    def failure_notes(self) -> list[str]:
        try:
            names = os.listdir(os.path.join(self.run_dir, HANGS))
        except OSError:
            return []
        return [n for n in names if n.startswith(f"failed-restart{restart_count()}-rank")]

    def _requeue(self, folder: str, job: str, restart: int, why: str) -> str:
        """One rank requeues the job (the first to create the marker file); the others leave it to that one."""
        try:
            os.close(os.open(os.path.join(folder, f"requeue-job{job}-restart{restart}"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return why + " (requeued by another rank)"
        except OSError:
            pass
        error = scontrol_requeue(job)
        if error:
            return f"requeue failed: scontrol requeue {job}: {error}"
        return f"requeued job {job}; it resumes from its last checkpoint"


def _remote_read_floor(data) -> float:
    """With remote or `pipe:` sources, a derived step budget is never shorter than one shard read's own limit
    (data.stall_timeout, data.retries, ...): the loader gives up on a stalled shard, skips and counts it, before
    the watchdog calls the step hung. (A step that needs several stalled shards in a row can still outlive its
    budget: a dead server then ends the run as a hang, its stack naming the read.)"""
    from ..data.remote import ReadOptions, scheme
    paths = [s.path for s in data.sources] + [path for _, path in data.validation_sets()]
    return ReadOptions.of(data).give_up_seconds() if any(scheme(p) for p in paths) else 0.0


def _say(line: str) -> None:
    os.write(2, (line + "\n").encode(errors="replace"))


def _end_children() -> str:
    """The data loader's worker processes: their stacks to stderr (SIGQUIT), then SIGKILL (they ignore the job's
    signals; one stuck in a read would outlive the run). Returns a note for the error line."""
    import multiprocessing
    children = multiprocessing.active_children()
    for sig, pause in ((signal.SIGQUIT, 0.3), (signal.SIGKILL, 0)):
        for child in children:
            try:
                os.kill(child.pid, sig)
            except OSError:
                pass
        time.sleep(pause if children else 0)
    return f" (the {len(children)} loader workers' stacks on stderr)" if children else ""


def _wake_local_peers() -> None:
    """Under torchrun: SIGCONT to the sibling ranks, so that a stopped one can act on torchrun's SIGTERM."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    me, parent = os.getpid(), os.getppid()
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            siblings = [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return
    for pid in siblings:
        if pid != me:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass


def describe_budgets(w) -> str:
    """The budgets in one line, for the start-up log."""
    step = f"{w.step_timeout:.0f} s" if w.step_timeout else \
        f"max({w.min_step_timeout:.0f} s, {w.step_timeout_factor:g} x slowest recent step)"
    return (f"watchdog: start-up {w.startup_timeout:.0f} s, first step {w.first_step_timeout:.0f} s, step {step}, "
            f"evaluation {w.evaluation_timeout:.0f} s, checkpoint {w.checkpoint_timeout:.0f} s; collectives "
            f"{w.collective_timeout:.0f} s" + ("" if w.enabled else " (watchdog off: collective timeouts only)"))

