"""`bigtrain submit`: a training run as a SLURM batch job, through submitit.

    bigtrain submit CONFIG [key=value ...] --nodes N --gpus-per-node G [--time MIN --partition P ...]

1. The config is loaded and checked for this job's world size (nodes x gpus-per-node ranks), the data
   manifests too, before anything is queued: a bad config ends as one `bigtrain: error: ...` line.
2. submitit writes an sbatch script (one task per GPU, `--signal=USR2@launch.signal_seconds`, `--requeue`,
   per-rank logs `JOBID_RANK_log.out|err` in the job folder, default RUN_DIR/slurm) and a pickle of
   `TrainJob(cfg)`; sbatch queues it. `--dry-run` prints that script and queues nothing.
3. In the job, every task runs `TrainJob` (job.py): torch.distributed from SLURM's variables, then
   `bigtrain.train.train(cfg)`; job.py says who handles which signal when.

submitit's private API is touched only in submitit_fence.py (the sbatch script's text and SLURM-proof quoting).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

from ..errors import BigtrainError
from .job import TrainJob
from .submitit_fence import check_version, executor_class, sbatch_script

TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                   "DEADLINE")


def _say(msg: str) -> None:
    print(f"[bigtrain submit] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ the sbatch script


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
    check_version()
    cls = executor_class()
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


# ------------------------------------------------------------------------------------------ submit


def check_submission(a):
    """Everything that can be checked before queueing: the config for this world size, the data, the
    SLURM options. Returns the config."""
    from ..config import load_config
    from ..data import check_data
    from ..parallel.engine import check_layout
    cfg = load_config(a.config, a.overrides)
    _check_args(a, cfg)
    check_layout(cfg, a.nodes * a.gpus_per_node)
    if not cfg.data.prepare:
        check_data(cfg)
    return cfg


def submit(a) -> None:
    cfg = check_submission(a)
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
