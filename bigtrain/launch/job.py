"""What every SLURM task of a `bigtrain submit` job runs on the compute node (the login-node side is submit.py).

submitit unpickles `TrainJob(cfg)` in each task and calls it: torch.distributed variables from SLURM's
(submitit's TorchDistributedEnvironment), then `bigtrain.train.train(cfg)` (NCCL on GPU, gloo on CPU).

Signals: who handles what, when (one requeue per time-limit stop, always bigtrain's rank 0):
- submitit's job wrapper installs its own handlers before calling TrainJob (USR2: checkpoint + `scontrol
  requeue` on rank 0; SIGTERM: ignored). TrainJob replaces them at once with `_SignalGuard`, so submitit's
  requeue never runs:
  * before training (imports, process group, model, data, restore): USR1/USR2 is held back and delivered
    again to bigtrain's `StopRequest` as soon as it is installed (one step is trained, then checkpoint and
    requeue); SIGTERM exits at once with 75 (nothing new to save; SLURM requeues a preempted job itself);
  * while training: bigtrain's `StopRequest` owns USR1/USR2/SIGTERM (train/stop.py): checkpoint at
    the next step boundary; after USR1/USR2 rank 0 runs `scontrol requeue` (while SLURM_RESTART_COUNT <
    launch.max_requeues);
  * after training (`StopRequest` restored the guard's handlers): USR1/USR2/SIGTERM are logged and ignored
    (the SIGTERM that follows bigtrain's own requeue lands here or in `StopRequest`).
- A hung run, or one that lost a rank (train/watchdog.py), requeues the job itself and leaves with os._exit(124): no result pickle
  either, so `--wait` follows the requeued job.
- A run that stopped early leaves with exit status 75 and *no* result pickle, so submitit (and `--wait`)
  keep waiting for the requeued run; errors raise (submitit writes an error pickle), exit 1, and SLURM
  does not requeue a FAILED job.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from ..errors import BigtrainError
from ..train.stop import EXIT_REQUEUE


def _say(msg: str) -> None:
    # os.write, not print: this also runs inside signal handlers, which may interrupt a print to stderr
    os.write(2, f"[bigtrain submit] {msg}\n".encode(errors="replace"))


class _SignalGuard:
    """The job's signal handlers outside bigtrain's training loop (see the module docstring)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending = 0          # a time-limit signal received before training started
        self.training_seen = False
        self.finished = False
        self._handler = self._handle  # one bound-method object, so `is` finds it again
        for s in self.SIGNALS:
            signal.signal(s, self._handler)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="bigtrain-signal-guard", daemon=True)
        self._watcher.start()

    def _ours(self) -> bool:
        return any(signal.getsignal(s) is self._handler for s in self.SIGNALS)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.finished or self.training_seen:
            _say(f"{name} after training ended: ignored")
        elif signum == signal.SIGTERM:
            _say(f"{name} before training started: exiting with {EXIT_REQUEUE} (nothing new to save)")
            os._exit(EXIT_REQUEUE)
        else:
            self.pending = self.pending or signum
            _say(f"{name} before training started: held back until training starts")

    def _watch(self) -> None:
        """Notice bigtrain's StopRequest taking the signals over; hand it any signal held back."""
        while not self._stop.wait(0.1):
            if not self.training_seen and not self._ours():
                self.training_seen = True
                if self.pending:
                    _say(f"training started: delivering the held-back {signal.Signals(self.pending).name}")
                    os.kill(os.getpid(), self.pending)
                return

    def close(self) -> None:
        self.finished = True
        self._stop.set()


class TrainJob:
    """What each SLURM task runs (pickled by submitit): set up torch.distributed from SLURM, train."""

    def __init__(self, cfg):
        self.cfg = cfg  # the config validated at submission (later edits of the YAML don't change the run)

    def __call__(self) -> dict:
        guard = _SignalGuard()
        try:
            import submitit
            dist_env = submitit.helpers.TorchDistributedEnvironment()
            # bigtrain picks the GPU (LOCAL_RANK among the visible ones): leave CUDA_VISIBLE_DEVICES as SLURM set it
            dist_env.export(set_cuda_visible_devices=False, overwrite=True)
            from ..train.stop import restart_count
            from ..train import train
            node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename  # SLURM's node name, else the host's
            _say(f"rank {dist_env.rank}/{dist_env.world_size} on {node}: master "
                 f"{dist_env.master_addr}:{dist_env.master_port}, SLURM job {os.environ.get('SLURM_JOB_ID')} "
                 f"restart {restart_count()}")
            try:
                result = train(self.cfg)
            except BigtrainError as e:
                print(f"bigtrain: error: {e}", file=sys.stderr, flush=True)
                raise
        finally:
            guard.close()
        if result.stopped:
            _say(f"stopped by {result.stopped} at step {result.step}: exiting with {EXIT_REQUEUE} "
                 "(no result: the job comes back if it was requeued)")
            sys.stdout.flush()
            sys.exit(EXIT_REQUEUE)  # SystemExit passes submitit's `except Exception`: no result pickle
        last = result.history[-1] if result.history else {}
        return {"rank": dist_env.rank, "step": result.step, "loss": last.get("loss")}
