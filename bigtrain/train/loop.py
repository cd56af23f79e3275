"""The training loop, top to bottom. Features plug into its seams (callbacks.py); the loop itself is this:

    set up processes, lock the run directory -> model (megatron-core) in DeepSpeed -> data -> restore
    -> for each step:
         callbacks.before_step
         lr, next batch (batches a rewind skipped are passed over)
         forward/backward -> gradients reduced and measured -> [every rank agrees, one all-reduce: veto? stop
         signal? a failure somewhere? checkpoint writers done?] -> update, or skip it
         callbacks.after_step (guard, spike detector, evaluation, interval checkpoints), metrics to the sinks
         act on what was agreed or asked: stop (checkpoint, requeue), rewind, checkpoint
    -> final checkpoint

A skipped step changes nothing but the data position: `step` counts updates applied; `batch_index` counts
global batches drawn (a skipped step's batch is consumed). Every failure ends every rank within seconds with a
one-line error: failures seen by one rank travel in the step's all-reduce, agreed ones are raised everywhere
at the same point, and nothing waits on a background thread on the way out.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..checkpoint import Checkpointer
from ..config import Config, dump, to_dict
from ..data import build_train_source, build_validation_sources, check_data
from ..data.corpus import prepare as prepare_corpus
from ..errors import BigtrainError
from ..model import build_model
from ..parallel import build_engine, check_layout, forward_backward, init_model_parallel, optimizer_step, setup
from ..parallel.distributed import lost_peer, on_rank0
from ..parallel.env import env_rank
from . import lock
from .callbacks import Callback, Callbacks
from .distillation import Distillation
from .evaluation import Evaluation
from .faults import FaultInjection
from .guard import NonFiniteGuard, SkippedBatches, SpikeDetector
from .lr import lr_at, set_lr
from .metrics import Metrics, setup_logging
from .samples import Samples
from .stragglers import StragglerReport
from .stop import StopRequest, check_restarts, restart_count
from .watchdog import HANGS, Watchdog, describe_budgets

log = logging.getLogger("bigtrain")

HISTORY = 1000  # TrainResult.history keeps the records of this many most recent steps


@dataclass
class TrainResult:
    history: list[dict]   # metrics of the last HISTORY steps this process trained
    step: int             # the step the run is at
    stopped: str = ""     # the signal that stopped it before train.steps ("" = it ran to the end)


class IntervalCheckpoint(Callback):
    """A checkpoint every `checkpoint.interval` steps."""

    def __init__(self, interval: int):
        self.interval = interval

    def after_step(self, trainer, record):
        if self.interval and record["applied"] and trainer.step % self.interval == 0:
            trainer.request_checkpoint("interval")


def train(cfg: Config, callbacks: list[Callback] = ()) -> TrainResult:
    """Train (or resume) the run described by `cfg`; `callbacks` join the built-in ones (last)."""
    check_restarts(cfg.launch.max_requeues)
    stop = StopRequest()  # from here on a stop signal is acted on at the first step boundary
    try:
        return Trainer(cfg, stop, list(callbacks)).fit()
    finally:
        stop.restore_handlers()


class Trainer:
    """The loop's state, shared with its callbacks: cfg, engine, data, ckpt, metrics, step, batch_index, ..."""

    def __init__(self, cfg: Config, stop: StopRequest, extra_callbacks: list[Callback]):
        self.cfg, self.stop, self.extra_callbacks = cfg, stop, extra_callbacks
        self.step = 0                  # optimizer updates applied
        self.batch_index = -1          # global index of the batch being trained (every batch drawn counts)
        self.batch = None              # this rank's share of it: token words [global batch / DP, seq + 1]
        self.skipped_steps = 0         # updates vetoed, over the life of the run
        self.source_tokens = {}        # trained tokens per data source, over the life of the run (>1 source)
        self.stopping = False          # a stop signal was agreed at this step
        self.resumed = False
        self.objective = None          # the per-token loss of a microbatch, when a callback sets one (distillation)
        self.history: deque = deque(maxlen=HISTORY)
        self.engine = self.data = self.ckpt = self.metrics = self.valid = None
        self._failure: str | None = None       # this rank's reason to stop the run (travels in the all-reduce)
        self._agreed_failure: tuple | None = None  # (message, unwell_since) every rank raises at the same point
        self._save_reason: str | None = None
        self._rewind: dict | None = None
        self._veto = ""
        self._sync_checkpoint = False
        self._since_save = {"skipped": 0, "spikes": 0}
        self._ckpt_failures = 0

    # --- requests from callbacks (made on every rank alike) ------------------------------------------------

    def request_checkpoint(self, reason: str) -> None:
        self._save_reason = self._save_reason or reason

    def request_rewind(self, before_step: int, reason: str) -> None:
        self._rewind = self._rewind or {"before_step": before_step, "reason": reason}

    def fail(self, message: str, unwell_since: int | None = None) -> None:
        """Stop the run with this one-line error (every rank calls it at the same point). `unwell_since`: the step
        at which the run's state went bad (the guards gave up): checkpoints from then on (less guard.rewind_margin)
        are set aside and a resume continues from the newest healthy one before."""
        self._agreed_failure = self._agreed_failure or (message, unwell_since)

    def note_anomaly(self, kind: str) -> None:
        self._since_save["spikes" if kind == "spike" else "skipped"] += 1

    # --- the run -------------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.watchdog = Watchdog(cfg, env_rank())
        self.watchdog.start()  # start-up is timed from here: a rank that never joins the rendezvous is a hang too
        try:
            return self._run()
        finally:
            self.watchdog.stop()  # on every way out: a process that trains again (tests) keeps no armed watchdog

    def _run(self) -> TrainResult:
        cfg = self.cfg
        try:
            self.env, self.device = setup(cfg.parallel.backend, cfg.watchdog.startup_timeout,
                                          dump_dir=os.path.join(cfg.run.dir, HANGS))
        except RuntimeError as e:
            self._hang_if_timed_out(lost_peer(e))
            raise
        self.rank = self.env.rank
        setup_logging(self.rank)
        on_rank0(lock.acquire, cfg.run.dir)
        error = None
        try:
            self._setup()
            self._restore()
            while self.step < cfg.train.steps:
                self.callbacks.before_step(self)
                record = self._train_step()
                self.callbacks.after_step(self, record)
                if record["applied"]:
                    self.history.append(self.metrics.step(record))
                with self.watchdog.phase("checkpoint"):
                    if self._act():
                        break
            with self.watchdog.phase("checkpoint"):
                self._finish()
        except RuntimeError as e:
            error = e
            why = lost_peer(e)
            if why is None:
                self.watchdog.note_failure(e)
                raise
            self._hang_if_timed_out(why)
            self.watchdog.lost_rank(why)  # a rank killed or lost with its node: requeue (never returns)
            raise BigtrainError(f"rank {self.rank}: another rank stopped answering during a collective ({why}); "
                                "its own error says why") from None
        except BaseException as e:
            error = e
            self.watchdog.note_failure(e)
            raise
        finally:
            self._close(error)
        dist.barrier()
        return TrainResult(list(self.history), self.step, self.stop.reason)

    def _hang_if_timed_out(self, why: str | None) -> None:
        """A collective or the rendezvous timed out: a hang (stacks, record, requeue, exit 124; never returns)."""
        if why and self.cfg.watchdog.enabled and ("timed out" in why.lower() or "timeout" in why.lower()):
            self.watchdog.collective_timed_out(why)

    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        _check_same_config(cfg, env.world)
        check_layout(cfg, env.world)
        if cfg.data.prepare:
            on_rank0(prepare_corpus, cfg)
        plan = check_data(cfg)
        init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        on_rank0(_check_writable, cfg.run.dir)
        log.info(f"run {cfg.run.name or os.path.basename(os.path.abspath(cfg.run.dir))}: "
                 f"{env.world} ranks ({env.launcher}, {self.device.type}): TP={cfg.parallel.tensor} "
                 f"PP={cfg.parallel.pipeline} DP={ps.get_data_parallel_world_size()} ZeRO-{cfg.parallel.zero_stage} "
                 f"{cfg.train.precision}")
        log.info(describe_budgets(cfg.watchdog))
        self.engine = build_engine(build_model(cfg), cfg)
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.data = build_train_source(cfg, dp_rank, dp_size, plan)
        self.valid = build_validation_sources(cfg, dp_rank, dp_size, plan)
        self.skips = SkippedBatches(cfg.run.dir)
        self.ckpt = Checkpointer(cfg, self.engine, self.data)
        self.metrics = Metrics(cfg, self.rank, env.world)
        self.callbacks = Callbacks([self.watchdog, StragglerReport(cfg.train.log_interval),
                                    FaultInjection(cfg.debug.faults, self.rank), NonFiniteGuard(cfg.guard),
                                    SpikeDetector(cfg.guard), Evaluation(cfg, self.valid), Samples(cfg),
                                    IntervalCheckpoint(cfg.checkpoint.interval),
                                    *([Distillation(cfg)] if cfg.distill.teacher else []), *self.extra_callbacks])

    def _restore(self) -> None:
        meta = self.ckpt.restore()
        self.resumed = bool(meta and meta["resumed"])
        if self.resumed:
            self.step = meta["step"]
            self._load_trainer_state(meta.get("trainer") or {})
        on_rank0(dump, self.cfg, os.path.join(self.cfg.run.dir, "config.yaml"))  # only once every check passed
        self.metrics.open(self.step)
        self.metrics.event("resume" if self.step else "start", self.step, world=self.env.world,
                           launcher=self.env.launcher, restart=restart_count())
        self.metrics.scalar("run/restarts", restart_count(), self.step)
        self.callbacks.on_start(self)

    # --- one step ------------------------------------------------------------------------------------------

    def _next_batch(self) -> torch.Tensor:
        """The next batch to train on, passing over batches that a rewind skipped (consumed, not trained)."""
        G = self.cfg.train.global_batch_size
        while True:
            index = self.data.index // G
            batch = self.data.next_batch()
            if index not in self.skips:
                self.batch_index = index
                return batch

    def _train_step(self) -> dict:
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.cfg)
        set_lr(self.engine, lr)
        self.batch = batch = self._next_batch().to(self.device, non_blocking=True)
        data_seconds = time.perf_counter() - t0
        per_source = []
        loss = forward_backward(self.engine, batch, self.cfg, objective=self.objective, per_source=per_source)
        self._veto = ""
        applied, grad_norm = optimizer_step(self.engine, self.cfg, lambda norm: self._agree(loss, norm))
        if applied:
            self.step += 1
        elif not self._agreed_failure:
            self.skipped_steps += 1
            self.note_anomaly("skipped")
            self.metrics.event("skipped_step", self.step + 1, batch=self.batch_index, loss=loss, grad_norm=grad_norm,
                               reason=self._veto)
        return dict(step=self.step if applied else self.step + 1, batch=self.batch_index, loss=loss, lr=lr,
                    grad_norm=grad_norm, skipped_steps=self.skipped_steps, step_seconds=time.perf_counter() - t0,
                    data_seconds=data_seconds, **self._per_source(per_source, applied),
                    applied=applied, skip_reason=self._veto)

    def _per_source(self, per_source: list, applied: bool) -> dict:
        """train/loss/<source> (mean over its trained tokens this step), train/tokens/<source> (trained tokens so
        far, in applied steps; kept in checkpoints)."""
        out = {}
        for src, (loss, tokens) in zip(self.data.sources, per_source):
            if applied:
                self.source_tokens[src.name] = self.source_tokens.get(src.name, 0) + tokens
            out[f"train/loss/{src.name}"] = loss
            out[f"train/tokens/{src.name}"] = self.source_tokens.get(src.name, 0)
        return out

    def _agree(self, loss: float, grad_norm: float) -> bool:
        """Called once per step on every rank, just before the update: the step's one all-reduce."""
        vetoes = [v if isinstance(v, str) else type(c).__name__ for c in self.callbacks.items
                  if (v := c.before_optimizer_step(self, loss, grad_norm)) is not True and v is not None]
        if self.metrics.failure and not self._failure:
            self._failure = f"rank {self.rank}: {self.metrics.failure}"
        flags = torch.tensor([1 if vetoes else 0, self.stop.signal, 1 if self._failure else 0,
                              0 if self.ckpt.ready() else 1], dtype=torch.int64, device=_flag_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        veto, signum, failed, writing = (int(x) for x in flags.tolist())
        self._veto = "; ".join(vetoes) if vetoes else "vetoed on another rank" if veto else ""
        if failed:  # the update is not applied; _act() raises on every rank once a save in flight is done
            messages = [None] * self.env.world
            dist.all_gather_object(messages, self._failure)
            self.fail(next(m for m in messages if m))
            return False
        self.stopping = self.stop.agree(signum) and self.step + (0 if veto else 1) < self.cfg.train.steps
        self._sync_checkpoint = self.ckpt.pending and not writing
        return not veto

    # --- between steps -------------------------------------------------------------------------------------

    def _act(self) -> bool:
        """Act on what the step agreed and the callbacks asked; True when the loop must end."""
        if self._sync_checkpoint:
            self.ckpt.sync()
        self._report_checkpoints()
        if self._agreed_failure:
            self._abort(*self._agreed_failure)
        if self.stopping:
            stall = self._save(self.stop.reason)
            self.metrics.event("stopped", self.step, reason=self.stop.reason, checkpoint_stall_s=stall)
            return True
        if self._rewind:
            self._do_rewind(self._rewind)
        elif self._save_reason:
            self._save(self._save_reason)
        self._save_reason = self._rewind = None
        return False

    def _trainer_state(self) -> dict:
        """What goes into each checkpoint besides the weights: the run's health since the previous save and the
        loop's and callbacks' own state."""
        last = self.history[-1] if self.history else {}
        well = not (self._since_save["skipped"] or self._since_save["spikes"])
        return {"health": {"healthy": well, "loss": last.get("loss"), **{f"{k}_since_previous": v
                                                                           for k, v in self._since_save.items()}},
                "trainer": {"skipped_steps": self.skipped_steps, "source_tokens": self.source_tokens,
                            "callbacks": self.callbacks.state_dict()}}

    def _load_trainer_state(self, state: dict) -> None:
        self.skipped_steps = state.get("skipped_steps", 0)
        self.source_tokens = dict(state.get("source_tokens") or {})
        self.callbacks.load_state_dict(state.get("callbacks") or {})

    def _save(self, reason: str) -> float:
        stall = self.ckpt.save(self.step, reason, self._trainer_state() if self.rank == 0 else None)
        self._since_save = {"skipped": 0, "spikes": 0}
        self._report_checkpoints()
        return stall

    def _report_checkpoints(self) -> None:
        """Events for the saves whose outcome is now known; stop after checkpoint.max_failures in a row."""
        for o in self.ckpt.outcomes:
            if o.error is None:
                self._ckpt_failures = 0
                self.metrics.event("checkpoint", o.step, reason=o.reason, stall_s=o.stats["stall_s"],
                                   write_s=o.stats.get("write_s"))
            else:
                self._ckpt_failures += 1
                self.metrics.event("checkpoint_failed", o.step, reason=o.reason, error=o.error)
                if o.fatal:
                    self.fail(o.error, unwell_since=o.step)
                elif self._ckpt_failures >= self.cfg.checkpoint.max_failures:
                    self.fail(f"{self._ckpt_failures} checkpoint saves in a row failed (checkpoint.max_failures="
                              f"{self.cfg.checkpoint.max_failures}), the last: {o.error}")
            self.callbacks.on_checkpoint(self, o.step, o.error)
        self.ckpt.outcomes.clear()

    def _do_rewind(self, request: dict) -> None:
        """Back to the newest healthy checkpoint from before the anomalies, skipping every batch drawn since."""
        g, cfg = self.cfg.guard, self.cfg
        self.ckpt.sync()
        self._report_checkpoints()
        since = request["before_step"]
        if len(self.skips.rewinds) >= g.max_rewinds:
            self._abort(f"rewind needed ({request['reason']}), but the run has rewound {len(self.skips.rewinds)} "
                        f"times already (guard.max_rewinds={g.max_rewinds}); stopping at step {self.step}", since)
        target = self.ckpt.choose(before_step=since - g.rewind_margin, healthy_only=True)
        if target is None:
            self._abort(f"rewind needed ({request['reason']}), but no healthy checkpoint from before step "
                        f"{since - g.rewind_margin} (guard.rewind_margin={g.rewind_margin}) exists; stopping at "
                        f"step {self.step}", since)
        meta = on_rank0(_read_meta, target)
        G = cfg.train.global_batch_size
        lo, hi = meta["data"]["index"] // G, self.batch_index + 1
        record = {"at_step": self.step, "to_step": meta["step"], "checkpoint": os.path.basename(target),
                  "reason": request["reason"]}
        self.skips.add(lo, hi, record)
        on_rank0(self.skips.save)
        self.ckpt.discard_after(meta["step"])
        restored = self.ckpt.restore(target, resume=True, data=False)
        self.step = restored["step"]
        self.history = deque((r for r in self.history if r["step"] <= self.step), maxlen=HISTORY)
        self._load_trainer_state(restored.get("trainer") or {})
        self._since_save = {"skipped": 0, "spikes": 0}
        self.metrics.rewind(self.step)
        self.metrics.event("rewind", self.step, skipped_batches=[lo, hi], **record)
        log.warning(f"rewound to {os.path.basename(target)} (step {self.step}): batches {lo}..{hi - 1} are skipped "
                    f"for good (recorded in {self.skips.path}); {request['reason']}")

    def _abort(self, message: str, unwell_since: int | None = None) -> None:
        """An agreed failure: let a save in flight finish, set aside what the run saved since it went bad, then
        raise on every rank."""
        self.ckpt.sync()
        self._report_checkpoints()
        if unwell_since is not None:
            kept = self.ckpt.set_aside_unhealthy(unwell_since - self.cfg.guard.rewind_margin)
            message += (f"; a resume continues from {kept}, the newest healthy checkpoint" if kept else
                        "; no healthy checkpoint exists")
        raise BigtrainError(message)

    def _finish(self) -> None:
        self.ckpt.finish(self.step, self._trainer_state() if self.rank == 0 else None)
        self._report_checkpoints()
        failures = [None] * self.env.world  # the last step's metrics: a sink that failed since the last all-reduce
        dist.all_gather_object(failures, self.metrics.failure and f"rank {self.rank}: {self.metrics.failure}")
        if any(failures):
            raise BigtrainError(next(f for f in failures if f))
        if self.stop.reason:
            self.metrics.event("requeue", self.step, action=self.stop.requeue(self.cfg.launch.max_requeues, self.rank),
                               restart=restart_count())

    def _close(self, error: BaseException | None) -> None:
        """Every way out: nothing here waits on another rank or on a stuck thread."""
        for closing in (lambda: self.callbacks.on_close(self, error) if hasattr(self, "callbacks") else None,
                        lambda: self.ckpt.close() if self.ckpt is not None else None,
                        lambda: self.data.close() if self.data is not None else None,
                        lambda: self.metrics.close() if self.metrics is not None else None,
                        lambda: self.engine.destroy() if self.engine is not None else None):
            try:
                closing()
            except Exception as e:  # the first error is the one that matters
                if error is None:
                    raise
                log.warning(f"while stopping: {type(e).__name__}: {e}")
        if self.rank == 0:
            lock.release(self.cfg.run.dir)


def _flag_device():
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_same_config(cfg: Config, world: int) -> None:
    """Every rank must train the same config (a run.dir or seed taken from a per-node variable would split the
    run into pieces that wait on each other forever)."""
    mine = _flat(to_dict(cfg))
    every = [None] * world
    dist.all_gather_object(every, mine)
    for rank, theirs in enumerate(every):
        for key in sorted(set(theirs) | set(every[0])):
            if theirs.get(key) != every[0].get(key):
                raise BigtrainError(f"the ranks disagree on the config: rank {rank} has {key}={theirs.get(key)!r}, "
                                    f"rank 0 has {every[0].get(key)!r} (every rank must get the same config)")


def _check_writable(run_dir: str) -> None:
    """Start-up: the run directory takes a file (a read-only or full disk is one line here, not a traceback later)."""
    probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("bigtrain\n" * 512)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise BigtrainError(f"run directory {run_dir} cannot be written ({e.strerror})") from None
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass


def _read_meta(path: str) -> dict:
    from ..checkpoint.store import validate
    return validate(path)
