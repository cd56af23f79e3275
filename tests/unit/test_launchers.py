"""Multi-node launch without SLURM: two torchrun launchers, one per "node" (--nnodes 2 --node_rank 0/1, the
first node's address as master), train one run whose fp32 losses equal one process's."""
import os
import subprocess
import sys

import helpers


def test_two_torchrun_launchers_train_one_run_like_one_process(data, tmp_path):
    run_dir = str(tmp_path / "run")
    overrides = helpers.tiny(data, run_dir, "train.steps=6")
    port = helpers.free_port()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "--no-python",
         "bigtrain", "train", os.devnull, *overrides],
        env=helpers.clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "2 ranks (torchrun, cpu): TP=1 PP=1 DP=2" in outs[0]
    got = helpers.losses(run_dir)
    want = helpers.reference_losses(str(tmp_path), helpers.tiny(data, "", "train.steps=6"))
    assert helpers.max_rel_diff(got, want) < 1e-5, (got, want)
