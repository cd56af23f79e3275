"""A save that fails on one rank only (here rank 1 hits the file-size limit, as a full disk would refuse
it) is reported on every rank -- without a file, since the failing disk may not take one -- the previous
checkpoint stays intact, and the end of the run says the last step could not be saved."""
import os
import resource

import pytest
import torch.distributed as dist

from bigtrain.checkpoint import CheckpointError, validate
from bigtrain.config import load_config
from bigtrain.train import train
from helpers import tiny


@pytest.mark.world(2)
def test_write_failure_on_one_rank(data, shared_dir):
    train(load_config(None, tiny(data, shared_dir, "train.steps=3", "parallel.zero_stage=2")))
    root = os.path.join(shared_dir, "checkpoints")
    good = os.path.join(root, "step-00000003")
    validate(good)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    if dist.get_rank() == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, limit[1]))
    try:
        with pytest.raises(CheckpointError) as e:
            train(load_config(None, tiny(data, shared_dir, "train.steps=6", "checkpoint.interval=3",
                                         "parallel.zero_stage=2")))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    msg = str(e.value)
    assert "checkpoint for step 6 was not saved (rank 1: " in msg and "File too large" in msg, msg
    assert "the previous checkpoint (step-00000003) is intact" in msg
    dist.barrier()
    validate(good)
    assert sorted(os.listdir(root)) == ["latest", "step-00000003"]
    assert open(os.path.join(root, "latest")).read().strip() == "step-00000003"
