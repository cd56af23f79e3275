"""A checkpoint saved on one layout resumes on another -- model, optimizer and data position -- and the
continued run matches the uninterrupted single-process run within 1e-5 (fp32)."""
import os
import shutil

import pytest
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.train import train
from helpers import max_rel_diff, tiny

STEPS, SAVED_AT = 8, 4


def _resume_across(data, shared_dir, reference, save_layout, load_layout, model=()):
    common = [f"train.steps={STEPS}", f"checkpoint.interval={SAVED_AT}", *model]
    first = train(load_config(None, tiny(data, shared_dir, *common, *save_layout)))
    assert [r["step"] for r in first.history] == list(range(1, STEPS + 1))
    if dist.get_rank() == 0:  # keep only the mid-run checkpoint, as if the job had died after it
        shutil.rmtree(os.path.join(shared_dir, "checkpoints", f"step-{STEPS:08d}"))
    dist.barrier()
    second = train(load_config(None, tiny(data, shared_dir, *common, *load_layout)))
    assert [r["step"] for r in second.history] == list(range(SAVED_AT + 1, STEPS + 1))
    want = reference(tiny(data, "-", *common))
    assert max_rel_diff([r["loss"] for r in first.history], want) < 1e-5
    assert max_rel_diff([r["loss"] for r in second.history], want[SAVED_AT:]) < 1e-5


@pytest.mark.world(4)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tp2_pp2_to_dp4(tied, data, shared_dir, reference):
    _resume_across(data, shared_dir, reference, ["parallel.tensor=2", "parallel.pipeline=2"],
                   ["parallel.zero_stage=2"], [f"model.tie_embeddings={str(tied).lower()}"])


@pytest.mark.world(4)
def test_dp4_zero3_to_tp2_dp2(data, shared_dir, reference):
    _resume_across(data, shared_dir, reference, ["parallel.zero_stage=3"], ["parallel.tensor=2"])


@pytest.mark.world(2)
def test_zero1_to_zero3(data, shared_dir, reference):
    _resume_across(data, shared_dir, reference, ["parallel.zero_stage=1"], ["parallel.zero_stage=3"])


@pytest.mark.world(2)
def test_zero3_to_zero1(data, shared_dir, reference):
    _resume_across(data, shared_dir, reference, ["parallel.zero_stage=3"], ["parallel.zero_stage=1"])


@pytest.mark.world(2)
def test_pp2_to_tp2_sequence_parallel(data, shared_dir, reference):
    _resume_across(data, shared_dir, reference, ["parallel.pipeline=2", "parallel.zero_stage=0"],
                   ["parallel.tensor=2", "parallel.sequence_parallel=true"])
