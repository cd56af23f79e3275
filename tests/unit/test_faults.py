"""Faults tried the way a cluster and a careless user would, on real runs: a corrupt checkpoint, a second run on
the same directory, a disk that fills mid-run (a real tmpfs), Ctrl-C after a failed save, an exception on one
rank of two, read-only and full run directories at start, broken YAML. Each ends in seconds with one line, and
the last good checkpoint stays."""
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

import helpers
from bigtrain.checkpoint import CheckpointError, resolve, validate
from bigtrain.checkpoint.store import verify
from bigtrain.config import ConfigError, load_config
from bigtrain.errors import BigtrainError


def cli(data, run_dir, *extra):
    return [sys.executable, "-m", "bigtrain", "train", os.devnull, *helpers.tiny(data, run_dir, *extra)]


def torchrun(data, run_dir, *extra, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(helpers.free_port()), "--no-python", "bigtrain", "train", os.devnull, *helpers.tiny(data, run_dir, *extra)]


def wait_for_steps(run_dir, n, proc, timeout=120):
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        if os.path.exists(path) and len(open(path).readlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir}: fewer than {n} steps after {timeout} s")


def events(run_dir):
    path = os.path.join(run_dir, "events.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


@contextlib.contextmanager
def tmpfs(path, size, ro=False):
    """A real small file system (as root): what a full or read-only disk really does."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], capture_output=True, text=True)
    assert proc.returncode == 0, f"these tests mount a tmpfs and must run as root: {proc.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def last_line(text):
    return text.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------- integrity

def test_flipped_byte_in_newest_checkpoint_is_named_and_skipped(data, tmp_path, caplog):
    from bigtrain.train import train
    run = str(tmp_path / "run")
    train(load_config(None, helpers.tiny(data, run, "train.steps=6", "checkpoint.interval=3")))
    newest = os.path.join(run, "checkpoints", "step-00000006")
    path = os.path.join(newest, "rank-00000.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # a byte in the middle of the tensor payload: same size, valid header
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x10]))
    validate(newest)  # sizes are right: only the checksum can tell
    with pytest.raises(CheckpointError, match=r"file rank-00000\.safetensors does not match its checksum"):
        verify(newest, validate(newest))
    assert resolve(run).endswith("step-00000003")  # what to-hf, eval and checkpoint.load take
    caplog.set_level("INFO", logger="bigtrain")
    result = train(load_config(None, helpers.tiny(data, run, "train.steps=6", "checkpoint.interval=3")))
    assert [r["step"] for r in result.history] == [4, 5, 6]
    msgs = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipping checkpoint" in msgs and "rank-00000.safetensors does not match its checksum" in msgs
    assert "resuming at step 3" in msgs


# ---------------------------------------------------------------------------------------------- the lock

def test_second_run_on_a_directory_is_refused_and_kill9_frees_it(data, tmp_path):
    run = str(tmp_path / "run")
    first = subprocess.Popen(cli(data, run, "train.steps=1000", "checkpoint.interval=2"), env=helpers.clean_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_steps(run, 3, first)
        t0 = time.time()
        second = subprocess.run(cli(data, run, "train.steps=1000", "train.lr=1e-2"), env=helpers.clean_env(),
                                capture_output=True, text=True, timeout=60)
        took = time.time() - t0
        assert second.returncode == 2 and took < 5, (second.returncode, took, second.stderr[-2000:])
        line = last_line(second.stderr)
        assert line.startswith(f"bigtrain: error: run directory {run} is in use by another bigtrain run: host ")
        assert f"pid {first.pid}," in line and "wait for it or use another run.dir" in line
    finally:
        first.kill()
        first.wait()
    # kill -9 left the lock file behind; the kernel lock died with the process: a resume takes it
    assert os.path.exists(os.path.join(run, ".lock"))
    again = subprocess.run(cli(data, run, "train.steps=2", "checkpoint.interval=2"), env=helpers.clean_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert events(run)[-1]["event"] == "resume"


def test_a_requeued_job_takes_over_its_earlier_incarnations_lock(tmp_path, monkeypatch):
    """A node lost while holding the lock (its file server keeps the lock until the lease ends): the same SLURM
    job, requeued, waits for it and then takes over; any other run is refused at once."""
    from bigtrain.train import lock
    run = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", f"from bigtrain.train import lock; lock.acquire({run!r}); "
                               "print('held', flush=True); import time; time.sleep(60)"],
                              env={**helpers.clean_env(), "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("SLURM_JOB_ID", "78")
        with pytest.raises(BigtrainError, match=rf"in use by another bigtrain run: .*pid {holder.pid}, SLURM job 77"):
            lock.acquire(run)
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        monkeypatch.setattr(lock, "STALE_WAIT_S", 1.5)
        t0 = time.time()
        lock.acquire(run)
        assert 1.0 < time.time() - t0 < 10
        lock.release(run)
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------- no hang, ever

def test_disk_full_mid_run_ends_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path):
    """A 10 MB tmpfs: two checkpoints (3.8 MB each) fit, the third does not. The run ends non-zero within
    seconds, with one line, and the last committed checkpoint and `latest` are intact."""
    with tmpfs(str(tmp_path / "disk"), "10m") as disk:
        run = os.path.join(disk, "run")
        t0 = time.time()
        proc = subprocess.run(cli(data, run, "train.steps=1000", "checkpoint.interval=3", "checkpoint.keep=10"),
                              env=helpers.clean_env(), capture_output=True, text=True, timeout=180)
        took = time.time() - t0
        assert proc.returncode != 0 and took < 90, (proc.returncode, took)
        line = last_line(proc.stderr)
        assert line.startswith("bigtrain: error: ") and "No space left on device" in line, proc.stderr[-3000:]
        root = os.path.join(run, "checkpoints")
        latest = open(os.path.join(root, "latest")).read().strip()
        good = os.path.join(root, latest)
        verify(good, validate(good))
        assert latest in ("step-00000003", "step-00000006")
        assert not [d for d in os.listdir(root) if d.startswith((".tmp", "step-")) and d > latest]


def test_ctrl_c_after_a_failed_save_ends_every_rank(data, tmp_path):
    """Two ranks; every save fails (a file-size limit that the rank files exceed, as a full disk would refuse
    them) and the run goes on (checkpoint.max_failures=100); then Ctrl-C reaches the whole process group: every
    process is gone within 30 s, non-zero, and nothing half-written is published."""
    run = str(tmp_path / "run")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        os.setsid()

    proc = subprocess.Popen(torchrun(data, run, "train.steps=1000", "checkpoint.interval=2",
                                     "checkpoint.max_failures=100"),
                            env=helpers.clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=limit)
    try:
        deadline = time.time() + 180
        while not any(e["event"] == "checkpoint_failed" for e in events(run)):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert time.time() - t0 < 30 and proc.returncode != 0, out[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    left = subprocess.run(["pgrep", "-f", run], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the run still alive: {left}"
    assert [e["event"] for e in events(run) if e["event"].startswith("checkpoint")][:1] == ["checkpoint_failed"]
    assert not [d for d in os.listdir(os.path.join(run, "checkpoints")) if d.startswith("step-")]


def test_an_exception_on_one_rank_ends_every_rank(data, tmp_path):
    run = str(tmp_path / "run")
    t0 = time.time()
    proc = subprocess.run(torchrun(data, run, "train.steps=1000", "debug.faults=[{kind: error, batch: 3, rank: 1}]"),
                          env=helpers.clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=180)
    assert proc.returncode != 0 and time.time() - t0 < 90, proc.stdout[-3000:]
    assert "injected fault (debug.faults): error on rank 1 at batch 3" in proc.stdout
    assert "bigtrain: error: rank 0: another rank stopped answering during a collective (" in proc.stdout
    assert len(helpers.losses(run)) == 3  # steps 1-3 trained, the 4th never finished


def test_a_rank_killed_without_a_word_ends_every_rank_as_a_lost_rank(data, tmp_path):
    """kill -9 of one rank mid-run (not an error of its own: no note in run.dir/hangs): the survivor's collective
    fails, it waits briefly for a failure note, finds none and ends the run like a hang -- stacks, a hangs.jsonl
    record of kind "lost rank", exit 124 (under SLURM it would requeue the job: tests/unit/test_slurm.py)."""
    run = str(tmp_path / "run")
    t0 = time.time()
    proc = subprocess.run(torchrun(data, run, "train.steps=1000", "debug.faults=[{kind: kill, batch: 3, rank: 1}]"),
                          env=helpers.clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=180)
    assert proc.returncode != 0 and time.time() - t0 < 90, proc.stdout[-3000:]
    assert len(helpers.losses(run)) == 3
    assert "bigtrain: error: rank 0: lost rank: another rank is gone without an error of its own (" in proc.stdout, \
        proc.stdout[-3000:]
    assert "not under SLURM: not requeued" in proc.stdout
    with open(os.path.join(run, "hangs", "hangs.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [(r["kind"], r["rank"], r["step"], r["requeue"]) for r in records] == [("lost rank", 0, 3, False)], records
    assert not [n for n in os.listdir(os.path.join(run, "hangs")) if n.startswith("failed-")]


# ---------------------------------------------------------------------------------------------- start-up

def test_read_only_and_full_run_directories_are_one_line(data, tmp_path):
    with tmpfs(str(tmp_path / "ro"), "1m", ro=True) as ro:
        proc = subprocess.run(cli(data, os.path.join(ro, "run")), env=helpers.clean_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert proc.stderr.strip() == f"bigtrain: error: run directory {ro}/run: cannot create it (Read-only file system)"
    with tmpfs(str(tmp_path / "full"), "64k") as full:
        with open(os.path.join(full, "filler"), "wb") as f:
            with contextlib.suppress(OSError):
                f.write(b"\0" * 70_000)
        proc = subprocess.run(cli(data, os.path.join(full, "run")), env=helpers.clean_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert "No space left on device" in proc.stderr and f"{full}/run" in proc.stderr


def test_invalid_yaml_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n   lr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert str(e.value) == f"{bad}:3:6: not valid YAML: mapping values are not allowed here"


def test_refused_resume_leaves_config_yaml_alone(data, tmp_path):
    from bigtrain.train import train
    run = str(tmp_path / "run")
    train(load_config(None, helpers.tiny(data, run, "train.steps=2")))
    before = open(os.path.join(run, "config.yaml")).read()
    with pytest.raises(CheckpointError, match="has shape"):
        train(load_config(None, helpers.tiny(data, run, "train.steps=4", "model.hidden_size=128")))
    assert open(os.path.join(run, "config.yaml")).read() == before
