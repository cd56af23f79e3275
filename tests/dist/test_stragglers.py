"""The straggler report on a real two-rank run: a rank that computes longer in each step is named, with its
ratio to the median, every log interval -- and the run goes on (report only)."""
import json
import os

import pytest
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.train import train
from helpers import tiny


@pytest.mark.world(2)
def test_the_slow_rank_is_named_with_its_ratio_to_the_median(data, shared_dir):
    slow = "debug.faults=[{kind: slow, batch: 0, rank: 1, value: 0.3}]"
    result = train(load_config(None, tiny(data, shared_dir, slow, "train.steps=4", "train.log_interval=2")))
    reports = [r for r in result.history if "straggler/slowest_rank" in r]
    assert [r["step"] for r in reports] == [2, 4] and len(result.history) == 4
    for r in reports:
        assert r["straggler/slowest_rank"] == 1 and r["straggler/ratio"] > 1.5, r
        assert r["straggler/slowest_s"] > 0.3 > r["straggler/median_s"] / 2
    if dist.get_rank() == 0:  # in metrics.jsonl as written
        rows = [json.loads(line) for line in open(os.path.join(shared_dir, "metrics.jsonl"))]
        assert [row.get("straggler/slowest_rank") for row in rows] == [None, 1, None, 1]
    dist.barrier()
