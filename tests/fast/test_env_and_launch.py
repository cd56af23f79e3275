"""Who a process is (launcher variables), the run-directory lock, and SLURM-proof quoting."""
import os
import shlex

import pytest

from bigtrain.errors import BigtrainError
from bigtrain.launch.submitit_fence import requote_sbatch, slurm_quote
from bigtrain.parallel.env import first_host, launch_env
from bigtrain.train import lock


@pytest.mark.parametrize("nodes, first", [("gpu[003-005,9],cpu1", "gpu003"), ("n1", "n1"), ("127.0.0.[2-3]", "127.0.0.2")])
def test_first_host(nodes, first):
    assert first_host(nodes) == first


def test_launch_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_")):
            monkeypatch.delenv(k)
    assert launch_env().launcher == "single" and launch_env().rank == 0
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "n[4-5]")
    e = launch_env()
    assert (e.rank, e.world, e.master_addr, e.master_port, e.launcher) == (3, 4, "n4", 20077, "slurm")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_env().launcher == "torchrun" and launch_env().rank == 1


def test_lock_is_reentrant_and_names_its_holder(tmp_path):
    run = str(tmp_path / "run")
    lock.acquire(run)
    lock.acquire(run)  # the command line, then train()
    lock.release(run)
    pid = os.fork()
    if pid == 0:  # another process: refused at once
        lock._held.clear()  # a process of its own, not a fork sharing the parent's hold
        try:
            lock.acquire(run)
            os._exit(1)
        except BigtrainError as e:
            os._exit(0 if f"pid {os.getppid()}," in str(e) else 2)
    assert os.waitpid(pid, 0)[1] == 0
    lock.release(run)
    pid = os.fork()
    if pid == 0:  # now free
        lock._held.clear()
        lock.acquire(run)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0


@pytest.mark.parametrize("value", ["plain", "my acct", 'a"b', "back\\slash", "$HOME #x", "ü"])
def test_slurm_quote_round_trips_through_sbatch_parsing(value):
    quoted = slurm_quote(value)
    # SLURM's #SBATCH parser: double quotes group, a backslash escapes the next character (as POSIX shells do
    # inside double quotes for \\ and \")
    assert shlex.split(quoted) == [value]
    assert requote_sbatch(f"#SBATCH --account={shlex.quote(value)}") == f"#SBATCH --account={quoted}"
