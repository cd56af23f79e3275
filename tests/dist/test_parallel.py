"""Every supported layout trains the same model as one process: per-step losses of the first 5 steps
(fp32, same seed and global batch) within 1e-5 relative of the single-process run."""
import pytest

from bigtrain.config import load_config
from bigtrain.train import train
from helpers import max_rel_diff, tiny

TOL = 1e-5

WORLD2 = [
    ["parallel.tensor=2"],
    ["parallel.pipeline=2"],
    ["parallel.zero_stage=0"],
    ["parallel.zero_stage=1"],
    ["parallel.zero_stage=2"],
    ["parallel.zero_stage=3"],
    ["parallel.tensor=2", "parallel.zero_stage=2"],
    ["parallel.tensor=2", "parallel.zero_stage=3"],
    ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    ["parallel.pipeline=2", "parallel.zero_stage=2"],
    ["parallel.pipeline=2", "model.tie_embeddings=true"],
    ["parallel.pipeline=2", "parallel.zero_stage=0", "model.tie_embeddings=true"],
    ["parallel.tensor=2", "parallel.activation_checkpointing=full"],
    ["parallel.pipeline=2", "parallel.activation_checkpointing=selective"],
    ["parallel.zero_stage=3", "parallel.activation_checkpointing=full", "model.tie_embeddings=true"],
]
WORLD4 = [
    ["parallel.tensor=2", "parallel.pipeline=2"],
    ["parallel.tensor=2", "parallel.pipeline=2", "model.tie_embeddings=true"],
    ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=0", "parallel.sequence_parallel=true"],
    ["parallel.zero_stage=1"],
    ["parallel.zero_stage=2"],
    ["parallel.zero_stage=3"],
    ["parallel.tensor=2", "parallel.zero_stage=2"],
    ["parallel.tensor=2", "parallel.zero_stage=3", "model.tie_embeddings=true"],
    ["parallel.pipeline=2", "parallel.zero_stage=2", "parallel.activation_checkpointing=full"],
]


def _reference_overrides(case):
    """The same run as one process: the case's model options, none of its parallel ones."""
    return [o for o in case if not o.startswith("parallel.")]


def _check(case, data, shared_dir, reference):
    got = [r["loss"] for r in train(load_config(None, tiny(data, shared_dir, *case))).history]
    want = reference(tiny(data, "-", *_reference_overrides(case)))
    assert len(got) == 5
    assert max_rel_diff(got, want) < TOL, (case, got, want)


@pytest.mark.world(2)
@pytest.mark.parametrize("case", WORLD2, ids=lambda c: "-".join(o.split(".", 1)[1].replace("=", "") for o in c))
def test_layout_matches_single_process_2(case, data, shared_dir, reference):
    _check(case, data, shared_dir, reference)


@pytest.mark.world(4)
@pytest.mark.parametrize("case", WORLD4, ids=lambda c: "-".join(o.split(".", 1)[1].replace("=", "") for o in c))
def test_layout_matches_single_process_4(case, data, shared_dir, reference):
    _check(case, data, shared_dir, reference)
