"""Validation losses are the same under any layout, and `bigtrain eval` of a checkpoint trained at TP2 x PP2
gives the same loss evaluated at TP2 x PP2, TP2 x DP2, DP4 and in one process (within 1e-5)."""
import json
import os

import pytest
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.eval.perplexity import evaluate_checkpoint
from bigtrain.train import train
from helpers import bigtrain, max_rel_diff, tiny

TOL = 1e-5


def _sets(data):
    return f"data.validation={{html: {data['val']}, http: {data['train_b']}}}"


def _val(history):
    return [r[k] for r in history for k in ("val/html/loss", "val/http/loss") if k in r]


@pytest.mark.world(2)
def test_validation_losses_equal_across_layouts(data, shared_dir):
    runs = {}
    for name, layout in (("dp2", []), ("tp2", ["parallel.tensor=2"]), ("pp2", ["parallel.pipeline=2"])):
        cfg = load_config(None, tiny(data, os.path.join(shared_dir, name), _sets(data), "train.steps=4",
                                     "train.eval_interval=2", "train.eval_batches=2", *layout))
        runs[name] = _val(train(cfg).history)
    assert len(runs["dp2"]) == 4
    for name in ("tp2", "pp2"):
        assert max_rel_diff(runs[name], runs["dp2"]) < TOL, (name, runs)


@pytest.mark.world(4)
def test_eval_of_tp2_pp2_checkpoint_in_any_layout(data, shared_dir):
    train(load_config(None, tiny(data, shared_dir, "parallel.tensor=2", "parallel.pipeline=2", "train.steps=3")))
    sets = [f"html={data['val']}", f"http={data['train_b']}"]
    got = {}
    for name, layout in (("tp2pp2", ["parallel.tensor=2", "parallel.pipeline=2"]), ("tp2dp2", ["parallel.tensor=2"]),
                         ("dp4", [])):
        out = evaluate_checkpoint(shared_dir, sets, batches=3, overrides=layout)
        box = [out]
        dist.broadcast_object_list(box, src=0)
        got[name] = [box[0]["sets"][s]["loss"] for s in ("html", "http")]
    if dist.get_rank() == 0:  # and one process, through the CLI
        proc = bigtrain("eval", shared_dir, "--data", sets[0], "--data", sets[1], "--batches", "3")
        one = json.loads(proc.stdout.strip().splitlines()[-1])["sets"]
        got["single"] = [one[s]["loss"] for s in ("html", "http")]
        for name, losses in got.items():
            assert max_rel_diff(losses, got["single"]) < TOL, got
        assert got["single"][0] != got["single"][1]
    dist.barrier()
