"""`bigtrain submit`: a training run as a SLURM batch job, through submitit.

    bigtrain submit CONFIG [key=value ...] --nodes N --gpus-per-node G [--time MIN --partition P ...]

1. The config is loaded and checked for this job's world size (nodes x gpus-per-node ranks), the data
   manifests too, before anything is queued: a bad config ends as one `bigtrain: error: ...` line.
2. submitit writes an sbatch script (one task per GPU, `--signal=USR2@launch.signal_seconds`, `--requeue`,
   per-rank logs `JOBID_RANK_log.out|err` in the job folder, default RUN_DIR/slurm) and a pickle of
   `TrainJob(cfg)`; sbatch queues it. `--dry-run` prints that script and queues nothing.
3. In the job, every task runs `TrainJob.__call__`: torch.distributed variables from SLURM's
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
- A run that stopped early leaves with exit status 75 and *no* result pickle, so submitit (and `--wait`)
  keep waiting for the requeued run; errors raise (submitit writes an error pickle), exit 1, and SLURM
  does not requeue a FAILED job.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

from ..errors import BigtrainError
from ..train.stop import EXIT_REQUEUE

TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                   "DEADLINE")
_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def _say(msg: str) -> None:
    # os.write, not print: this also runs inside signal handlers, which may interrupt a print to stderr
    os.write(2, f"[bigtrain submit] {msg}\n".encode(errors="replace"))


# ------------------------------------------------------------------------------------------- the job


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
            _say(f"rank {dist_env.rank}/{dist_env.world_size} on {os.uname().nodename}: master "
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


# ------------------------------------------------------------------------------------ the sbatch script


def slurm_quote(value) -> str:
    """A value as SLURM's #SBATCH parser reads it back unchanged: double quotes group, a backslash
    escapes the next character. (submitit shell-quotes these values, which SLURM does not read back
    exactly: a backslash is lost.)"""
    value = str(value)
    if _SAFE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _requote_sbatch(text: str) -> str:
    out = []
    for line in text.split("\n"):
        m = re.fullmatch(r"#SBATCH --([A-Za-z0-9_-]+)=(.*)", line)
        if m:
            (value,) = shlex.split(m.group(2))  # undoes submitit's shlex.quote
            line = f"#SBATCH --{m.group(1)}={slurm_quote(value)}"
        out.append(line)
    return "\n".join(out)


def _executor_class():
    from submitit.slurm.slurm import SlurmExecutor

    class BigtrainExecutor(SlurmExecutor):
        allow_without_slurm = False

        @classmethod
        def affinity(cls) -> int:
            return 2 if cls.allow_without_slurm or shutil.which("srun") else -1

        def _make_submission_file_text(self, command: str, uid: str) -> str:
            return _requote_sbatch(super()._make_submission_file_text(command, uid))

    return BigtrainExecutor


def _check_value(name: str, value) -> None:
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in str(value)):
        raise BigtrainError(f"--{name}: control characters (newlines, tabs) cannot go into an sbatch script: {value!r}")


def _check_args(a, cfg) -> None:
    for name in ("nodes", "gpus_per_node", "time"):
        v = getattr(a, name)
        if v is None or v < 1:
            raise BigtrainError(f"--{name.replace('_', '-')}: expected a positive integer, got {v}")
    if a.cpus_per_task is not None and a.cpus_per_task < 1:
        raise BigtrainError(f"--cpus-per-task: expected a positive integer, got {a.cpus_per_task}")
    for name in ("job_name", "partition", "account", "qos", "constraint", "mem", "folder"):
        _check_value(name.replace("_", "-"), getattr(a, name))
    if not a.job_name:
        raise BigtrainError("--job-name: expected a name, got nothing")
    if a.mem is not None and not re.fullmatch(r"[0-9]+[KMGT]?B?", a.mem, re.I):
        raise BigtrainError(f"--mem: expected a size such as 200G or 64000M, got {a.mem!r}")
    s = cfg.launch.signal_seconds
    if not 1 <= s < a.time * 60:
        raise BigtrainError(f"config key 'launch.signal_seconds': {s} s must be at least 1 and less than the "
                            f"--time limit of {a.time} min ({a.time * 60} s): SLURM sends the checkpoint "
                            f"signal that long before the limit")
    if s > 65535:
        raise BigtrainError(f"config key 'launch.signal_seconds': {s} is more than SLURM's maximum 65535")


def make_executor(a, cfg, folder: str):
    """The submitit executor for these `bigtrain submit` arguments (parameters only; nothing queued)."""
    cls = _executor_class()
    cls.allow_without_slurm = bool(a.dry_run)
    if cls.affinity() < 0:
        raise BigtrainError("srun not found: run `bigtrain submit` on a SLURM login node "
                            "(or use --dry-run to see the sbatch script)")
    executor = cls(folder=folder, max_num_timeout=cfg.launch.max_requeues)
    tasks = a.gpus_per_node
    threads = a.cpus_per_task or 1
    params = dict(
        job_name=a.job_name,
        time=a.time,
        nodes=a.nodes,
        ntasks_per_node=tasks,                  # one task (rank) per GPU
        signal_delay_s=cfg.launch.signal_seconds,
        # setup lines run in the batch script before srun; every user value in them is shell-quoted
        setup=[
            "# what this job runs (the submitted pickle holds the validated config; this line is a record)",
            "bigtrain_command=(" + " ".join(shlex.quote(x) for x in
                                            ["bigtrain", "train", str(a.config), *a.overrides]) + ")",
            f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}",
        ],
        additional_parameters={"requeue": True, "chdir": os.getcwd()},
        wckey=None,                             # submitit's default "submitit" can be refused where wckeys are tracked
        srun_args=["--kill-on-bad-exit=1"],
    )
    if not a.cpu:
        params["gpus_per_node"] = a.gpus_per_node
    for name in ("cpus_per_task", "partition", "account", "qos", "constraint", "mem"):
        if getattr(a, name) is not None:
            params[name] = getattr(a, name)
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor) -> str:
    """The sbatch script submitit writes for this executor (what --dry-run prints)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# ------------------------------------------------------------------------------------------ submit


def validate(a):
    """Everything that can be checked before queueing: the config for this world size, the data, the
    SLURM options. Returns the config."""
    from ..config import load_config
    from ..data import check_manifest
    from ..parallel.engine import check_layout
    cfg = load_config(a.config, a.overrides)
    _check_args(a, cfg)
    check_layout(cfg, a.nodes * a.gpus_per_node)
    if not cfg.data.prepare:
        check_manifest(cfg)
    return cfg


def submit(a) -> None:
    cfg = validate(a)
    folder = os.path.abspath(a.folder or os.path.join(cfg.run.dir, "slurm"))
    _check_value("folder (from run.dir)", folder)
    _check_value("chdir (the current directory)", os.getcwd())
    executor = make_executor(a, cfg, folder)
    if a.dry_run:
        sys.stdout.write(sbatch_script(executor))
        sys.stdout.flush()
        _say(f"dry run: nothing submitted (job folder would be {folder})")
        return
    job = executor.submit(TrainJob(cfg))
    ranks = a.nodes * a.gpus_per_node
    print(f"submitted job {job.job_id}: {ranks} ranks ({a.nodes} node(s) x {a.gpus_per_node}), "
          f"run directory {os.path.abspath(cfg.run.dir)}")
    print(f"logs: {folder}/{job.job_id}_<rank>_log.out and .err (rank 0: {job.paths.stdout})")
    print(f"sbatch script: {job.paths.submission_file}")
    sys.stdout.flush()
    if a.wait:
        sys.exit(wait(job))


def _sacct_state(job_id: str) -> str:
    proc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)],
                          capture_output=True, text=True)
    return (proc.stdout.strip().splitlines() or ["UNKNOWN"])[-1].split()[0] if proc.returncode == 0 else "UNKNOWN"


def wait(job) -> int:
    """Wait for every task's result (across requeues), print the final state; 0 when COMPLETED."""
    print(f"waiting for job {job.job_id} ...", flush=True)
    errors = []
    results = []
    try:
        for k in range(job.num_tasks):
            task = job.task(k)
            try:
                results.append(task.result())
            except Exception as e:  # a failed task: its trace, or "no result" for one killed by SLURM
                errors.append((k, e))
    except KeyboardInterrupt:
        print(f"stopped waiting; job {job.job_id} goes on (squeue -j {job.job_id}; scancel {job.job_id})")
        return 130
    state = "UNKNOWN"
    for _ in range(60):  # the result pickles are written just before the tasks exit
        state = _sacct_state(job.job_id)
        if state.startswith(TERMINAL_STATES):
            break
        time.sleep(1)
    if errors:
        from submitit.core.utils import FailedJobError
        errors.sort(key=lambda ke: not isinstance(ke[1], FailedJobError))  # a task's own trace first
        k, e = errors[0]
        print(f"job {job.job_id}: {state}; task {k} failed:\n{str(e).strip()}", flush=True)
        return 1
    r0 = results[0] if results else {}
    print(f"job {job.job_id}: {state} at step {r0.get('step')}, final loss {r0.get('loss')}", flush=True)
    return 0 if state == "COMPLETED" else 1
