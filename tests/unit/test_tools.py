"""The benchmark scripts in tools/ run end to end on the CPU (smoke tests: their figures are measured by
running them, not asserted here)."""
import os
import re
import subprocess
import sys

import helpers

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools")


def run(*args, timeout=600):
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, args[0]), *args[1:]], env=helpers.clean_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout.strip().splitlines()[-1]


def test_bench_training_cpu_smoke():
    last = run("bench.py", "--workload", "tiny", "--steps", "2", "--warmup", "1", "--no-peer")
    assert re.fullmatch(r"bigtrain_mfu=[\d.]+ peer_mfu=n/a ratio=n/a", last), last


def test_bench_data_smoke(tmp_path):
    last = run("bench_data.py", "--tokens", "2e6", "--workdir", str(tmp_path))
    assert re.fullmatch(r"tokens_per_s=\d+ ratio_to_plain_wds=[\d.]+ ratio_to_mmap=[\d.]+", last), last


def test_bench_ckpt_smoke(tmp_path):
    last = run("bench_ckpt.py", "--preset", "tiny", "--saves", "2", "--restores", "1", "--workdir", str(tmp_path))
    assert re.fullmatch(r"stall_s=[\d.]+ write_GBps=[\d.]+ bytes=\d+ params=\d+", last), last


def test_bench_guard_smoke(tmp_path):
    last = run("bench_guard.py", "--steps", "10", "--workdir", str(tmp_path))
    assert re.fullmatch(r"guard_us_per_step=\d+ step_ms=[\d.]+ guard_share=[\d.]+", last), last
