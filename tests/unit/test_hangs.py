"""The hang watchdog on real multi-rank runs (torchrun, gloo): a rank frozen by SIGSTOP and a rank asleep inside
its step end the job within twice the step budget, with every live rank's stacks in the run directory; a
collective that times out is a hang too; a rank that never joins the rendezvous ends the start-up. (The SLURM
requeue after a hang is in test_slurm.py; the budgets and the requeue decision in tests/fast/test_watchdog.py.)"""
import json
import os
import subprocess
import sys
import time

import pytest

import helpers

BUDGET = 4.0  # seconds a step may take in these runs


def run(data, run_dir, *extra, nproc=2, env=None, timeout=180):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(helpers.free_port()), "--no-python"] if nproc > 1 else []) + \
          (["bigtrain"] if nproc > 1 else [sys.executable, "-m", "bigtrain"]) + \
          ["train", os.devnull, *helpers.tiny(data, run_dir, "train.steps=500", *extra)]
    proc = subprocess.Popen(cmd, env=env or helpers.clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
    finally:
        proc.kill()
    return proc.returncode, out, time.time()


def hangs(run_dir):
    with open(os.path.join(run_dir, "hangs", "hangs.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("kind", ["stop", "hang"])
def test_a_frozen_or_sleeping_rank_ends_the_job_within_twice_the_step_budget(data, tmp_path, kind):
    run_dir = str(tmp_path / "run")
    fault = f"debug.faults=[{{kind: {kind}, batch: 20, rank: 1, value: 600}}]"
    rc, out, ended = run(data, run_dir, f"watchdog.step_timeout={BUDGET}", fault)
    assert rc != 0, out[-3000:]
    records = hangs(run_dir)
    first = min(records, key=lambda r: r["time"])
    hung_at = first["time"] - first["elapsed"]  # when the stuck step began
    print(f"{kind}: the job ended {ended - hung_at:.1f} s after the step began (budget {BUDGET} s)")
    assert ended - hung_at < 2 * BUDGET
    live = next(r for r in records if r["rank"] == 0)  # (the sleeping rank's own watchdog may speak first)
    assert live["phase"] == "step" and live["step"] == 20 and not live["requeue"], records
    # the live rank's stacks: its main thread waits in a collective of the step
    dump = open(os.path.join(run_dir, "hangs", "restart0-rank0.txt")).read()
    assert "bigtrain hang: rank 0" in dump and "all_reduce" in dump and "_train_step" in dump, dump
    line = next(l for l in out.splitlines() if l.startswith("bigtrain: error: rank 0: hang:"))
    assert ("step took more than 4 s (watchdog.step_timeout) at step 20; stacks of every thread in "
            f"{run_dir}/hangs/restart0-rank0.txt; not under SLURM: not requeued") in line
    assert "exitcode: 124" in out
    if kind == "hang":  # the sleeping rank dumps its own stacks too: asleep in the fault's hook
        assert "faults.py" in open(os.path.join(run_dir, "hangs", "restart0-rank1.txt")).read()


def test_a_collective_that_times_out_is_a_hang(data, tmp_path):
    """A step budget far away and a short collective timeout: rank 0's collective gives up first (the timeout
    reached megatron's data-parallel group, where the loss is averaged), and that is handled as a hang."""
    run_dir = str(tmp_path / "run")
    rc, out, _ = run(data, run_dir, "watchdog.step_timeout=120", "watchdog.collective_timeout=3",
                     "debug.faults=[{kind: hang, batch: 10, rank: 1, value: 8}]")
    assert rc != 0
    rank0 = [r for r in hangs(run_dir) if r["rank"] == 0]
    assert len(rank0) == 1 and "a collective timed out in step" in rank0[0]["cause"], rank0
    assert 2.5 < rank0[0]["elapsed"] < 20, rank0
    assert "bigtrain: error: rank 0: hang: a collective timed out in step (" in out
    assert os.path.exists(os.path.join(run_dir, "hangs", "restart0-rank0.txt"))


def test_a_rank_that_never_joins_ends_the_start_up(data, tmp_path):
    """Rank 0 of a two-rank job whose rank 1 never starts: the rendezvous is timed as start-up."""
    run_dir = str(tmp_path / "run")
    env = helpers.clean_env(OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(helpers.free_port()))
    t0 = time.time()
    rc, out, ended = run(data, run_dir, "watchdog.startup_timeout=3", nproc=1, env=env, timeout=120)
    assert rc == 124, out[-3000:]
    assert "bigtrain: error: rank 0: hang:" in out and "start-up" in out, out[-3000:]
    record, = hangs(run_dir)
    assert record["phase"] == "start-up" and record["step"] == 0
    assert os.path.exists(record["dump"])
    print(f"missing rank: exit {ended - t0:.1f} s after launch (start-up budget 3 s)")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_read_that_never_returns_is_a_hang(data, tmp_path, workers):
    """Hangs outside collectives: the only shard is a FIFO nobody writes to (a read stuck like one on a dead
    file server), read in the training process or in a loader worker. The first step's budget ends the run."""
    fifo = str(tmp_path / "stuck-000000.tar")
    os.mkfifo(fifo)
    run_dir = str(tmp_path / "run")
    rc, out, _ = run(data, run_dir, "watchdog.first_step_timeout=3", f"data.sources=[{{path: {fifo}}}]",
                     "data.lanes=1", f"data.num_workers={workers}", nproc=1, timeout=120)
    assert rc == 124, out[-3000:]
    assert "bigtrain: error: rank 0: hang: first step took more than 3 s (watchdog.first_step_timeout) at step 0" \
        in out, out[-3000:]
    dump = open(os.path.join(run_dir, "hangs", "restart0-rank0.txt")).read()
    assert ("members.py" if workers == 0 else "from_worker") in dump, dump


def descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in descendants(k)]


def test_loader_workers_die_with_a_killed_trainer(data, tmp_path):
    """kill -9 of a trainer leaves no loader worker behind (they ignore the job's signals, so nothing else
    would end them)."""
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "bigtrain", "train", os.devnull,
           *helpers.tiny(data, run_dir, "train.steps=100000", "data.num_workers=2")]
    proc = subprocess.Popen(cmd, env=helpers.clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        metrics, deadline = os.path.join(run_dir, "metrics.jsonl"), time.time() + 120
        while not (os.path.exists(metrics) and os.path.getsize(metrics)):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        workers = descendants(proc.pid)  # the loader workers are the fork server's children
        assert len(workers) >= 4, workers  # resource tracker, fork server, 2 workers
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2] for p in workers):
        assert time.time() < deadline, "a loader worker outlived its killed trainer"
        time.sleep(0.1)
