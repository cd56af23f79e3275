"""Checkpoints: exact resume after kill -9 and after a stop signal, torn checkpoints, retention, I/O errors,
loading from another run, and the no-pickle guarantee. Real training runs (single process, fp32, CPU)."""
import json
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import helpers
from bigtrain.checkpoint import CheckpointError, validate
from bigtrain.config import load_config

STEPS = 24


def overrides(data, run_dir, *extra):
    return helpers.tiny(data, run_dir, f"train.steps={STEPS}", "checkpoint.interval=3", "checkpoint.keep=3", *extra)


def run_inprocess(data, run_dir, *extra):
    from bigtrain.train import train
    return train(load_config(None, overrides(data, run_dir, *extra)))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Per-step losses of an uninterrupted run."""
    run_dir = str(tmp_path_factory.mktemp("reference"))
    helpers.bigtrain("train", os.devnull, *overrides(data, run_dir))
    got = helpers.losses(run_dir)
    assert len(got) == STEPS and got[-1] < got[0]
    return got


def ckpt_root(run_dir):
    return os.path.join(run_dir, "checkpoints")


def step_dirs(run_dir):
    return sorted(d for d in os.listdir(ckpt_root(run_dir)) if d.startswith("step-"))


def test_kill9_at_random_moments_resumes_bit_for_bit(data, reference, tmp_path):
    """kill -9 twice at random moments (mid-step, mid-save, mid-commit alike), resume each time: the
    per-step losses of the finished run equal the uninterrupted run's exactly."""
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "bigtrain", "train", os.devnull, *overrides(data, run_dir)]
    rng = random.Random(1234)
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen(cmd, env=helpers.clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if kills < 2:
            # wait until this attempt is training (a few steps past its start), then kill at a random instant
            start = len(helpers.losses(run_dir)) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else 0
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and len(helpers.losses(run_dir)) >= start + 1:
                    break
                time.sleep(0.05)
            # a random instant within the next ~6 steps (measured on this machine), saves every 3 steps
            step_s = helpers.read_metrics(run_dir)[-1]["step_seconds"] if os.path.exists(
                os.path.join(run_dir, "metrics.jsonl")) else 0.1
            time.sleep(rng.uniform(0.0, 6 * step_s))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait(timeout=300)
        if proc.returncode == 0:
            break
    assert kills == 2, "the run finished before it could be killed twice: make it longer"
    assert proc.returncode == 0
    got = helpers.losses(run_dir)
    assert [r["step"] for r in helpers.read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert got == reference  # bit for bit
    events = [json.loads(line)["event"] for line in open(os.path.join(run_dir, "events.jsonl"))]
    assert events.count("resume") >= 1


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_stop_signal_saves_at_step_boundary_and_resumes(sig, data, reference, tmp_path):
    """SIGUSR1 (SLURM before a time limit) or SIGTERM (preemption, scancel): checkpoint at the next step
    boundary, exit 75; the next start resumes there and finishes identically."""
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "bigtrain", "train", os.devnull, *overrides(data, run_dir, "checkpoint.interval=0")]
    proc = subprocess.Popen(cmd, env=helpers.clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and len(helpers.losses(run_dir)) >= 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    stopped = [json.loads(line) for line in open(os.path.join(run_dir, "events.jsonl")) if '"stopped"' in line]
    assert len(stopped) == 1 and stopped[0]["reason"] == sig.name
    stopped_at = len(helpers.losses(run_dir))
    assert stopped_at < STEPS
    assert step_dirs(run_dir) == [f"step-{stopped_at:08d}"]
    helpers.bigtrain("train", os.devnull, *overrides(data, run_dir, "checkpoint.interval=0"))
    assert helpers.losses(run_dir) == reference


def test_torn_checkpoints_fall_back_to_previous_good_one(data, tmp_path, caplog):
    run_dir = str(tmp_path / "run")
    run_inprocess(data, run_dir, "train.steps=9")
    assert step_dirs(run_dir) == ["step-00000003", "step-00000006", "step-00000009"]
    # the newest lost the end of its tensor file, the one before never got its meta.json
    with open(os.path.join(ckpt_root(run_dir), "step-00000009", "rank-00000.safetensors"), "r+b") as f:
        f.truncate(1000)
    os.remove(os.path.join(ckpt_root(run_dir), "step-00000006", "meta.json"))
    with pytest.raises(CheckpointError, match="torn"):
        validate(os.path.join(ckpt_root(run_dir), "step-00000009"))
    caplog.set_level("INFO", logger="bigtrain")
    result = run_inprocess(data, run_dir, "train.steps=9")
    assert [r["step"] for r in result.history] == [4, 5, 6, 7, 8, 9]
    msgs = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipping checkpoint" in msgs and "step-00000009" in msgs and "step-00000006" in msgs
    assert "resuming at step 3" in msgs


def test_keep_last_k(data, tmp_path):
    run_dir = str(tmp_path / "run")
    run_inprocess(data, run_dir, "checkpoint.keep=2")
    assert step_dirs(run_dir) == ["step-00000021", "step-00000024"]
    assert open(os.path.join(ckpt_root(run_dir), "latest")).read().strip() == "step-00000024"
    assert not [d for d in os.listdir(ckpt_root(run_dir)) if d.startswith(".tmp")]


def test_io_error_during_save_keeps_previous_checkpoint(data, tmp_path):
    """A save that hits an OS write error (here: the file-size limit, EFBIG, as a full disk gives ENOSPC)
    reports it, leaves the previous checkpoint and `latest` untouched, and the run exits with an error."""
    run_dir = str(tmp_path / "run")
    helpers.bigtrain("train", os.devnull, *overrides(data, run_dir, "train.steps=3"))
    good = os.path.join(ckpt_root(run_dir), "step-00000003")
    meta = validate(good)
    size = meta["files"]["rank-00000.safetensors"]

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    proc = helpers.bigtrain("train", os.devnull, *overrides(data, run_dir, "train.steps=6"), check=False,
                            preexec_fn=small_files)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "checkpoint for step 6 was not saved" in proc.stdout and "File too large" in proc.stdout
    assert "previous checkpoint (step-00000003) is intact" in proc.stdout
    validate(good)
    assert open(os.path.join(ckpt_root(run_dir), "latest")).read().strip() == "step-00000003"
    assert step_dirs(run_dir) == ["step-00000003"]
    assert not [d for d in os.listdir(ckpt_root(run_dir)) if d.startswith(".tmp")]


def test_sync_and_async_saves_give_the_same_run(data, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    result = run_inprocess(data, run_dir, "checkpoint.async_save=false")
    assert [r["loss"] for r in result.history] == reference
    assert step_dirs(run_dir) == ["step-00000018", "step-00000021", "step-00000024"]


def test_load_from_another_run_without_pickle(data, reference, tmp_path, monkeypatch):
    """checkpoint.load starts a new run from another run's weights (load_optimizer=false: step 0, fresh
    optimizer and data) or resumes it (load_optimizer=true); no file is unpickled on the way."""
    src = str(tmp_path / "src")
    run_inprocess(data, src)
    files = os.listdir(os.path.join(ckpt_root(src), "step-00000018"))
    assert all(f.endswith((".json", ".safetensors")) for f in files), files

    def refuse(*a, **k):
        raise AssertionError("checkpoint loading unpickled something")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)

    resumed = run_inprocess(data, str(tmp_path / "resume"), f"checkpoint.load={ckpt_root(src)}/step-00000018")
    assert [r["step"] for r in resumed.history] == list(range(19, STEPS + 1))
    assert [r["loss"] for r in resumed.history] == reference[18:]
    fresh = run_inprocess(data, str(tmp_path / "fresh"), f"checkpoint.load={src}", "checkpoint.load_optimizer=false",
                          "train.steps=2")
    assert [r["step"] for r in fresh.history] == [1, 2]
    # same first batch as the reference run's first step, but trained weights: a lower loss
    assert fresh.history[0]["loss"] < reference[0] - 0.1


def test_checkpoint_of_a_different_model_is_refused(data, tmp_path):
    src = str(tmp_path / "src")
    run_inprocess(data, src, "train.steps=2")
    with pytest.raises(CheckpointError, match=r"embedding\.word_embeddings\.weight has shape \[512, 64\] in the "
                                              r"checkpoint, the model configured here expects \[512, 128\]"):
        run_inprocess(data, str(tmp_path / "other"), f"checkpoint.load={src}", "model.hidden_size=128")
