"""Runs the multi-rank suite (tests/dist) under torchrun at 2 and 4 ranks, gloo on CPU."""
import os
import re
import subprocess
import sys

import pytest

import helpers

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("world", [2, 4])
def test_multi_rank_suite(world, tmp_path, shared_cache):
    env = helpers.clean_env(BIGTRAIN_TEST_CACHE=shared_cache, BIGTRAIN_DIST_BASETEMP=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_port", str(helpers.free_port()), "-m", "pytest", os.path.join(HERE, "dist"),
           "-q", "-p", "no:cacheprovider", "--timeout", "900", "-x", "-rf"]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3000)
    out = proc.stdout
    sys.stdout.write(out[-20000:])
    failed = sorted(set(re.findall(r"FAILED (\S+)", out)))
    assert proc.returncode == 0, f"torchrun world={world} exited {proc.returncode}; failed: {failed or 'see output'}"
    assert re.search(r"\d+ passed", out), "no multi-rank test ran"
