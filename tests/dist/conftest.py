"""Runs inside `torchrun --nproc_per_node N -m pytest tests/dist`: one gloo process group for the
session, every rank running the same tests in the same order. `@pytest.mark.world(n)` keeps a test to
sessions of n ranks (others deselect it, they don't skip it)."""
import os
import sys
import tempfile

import pytest
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))
CACHE = os.environ.get("BIGTRAIN_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "bigtrain-test-cache")
os.makedirs(CACHE, exist_ok=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "world(n): run only in the torchrun session of n ranks")
    if config.option.basetemp is None:  # one per rank: pytest empties its basetemp at start
        root = os.environ.get("BIGTRAIN_DIST_BASETEMP") or tempfile.mkdtemp(prefix="bigtrain-dist-")
        config.option.basetemp = os.path.join(root, f"rank{RANK}")
    from bigtrain.parallel.distributed import setup
    setup("gloo", timeout_s=600)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        m = item.get_closest_marker("world")
        (keep if m is None or m.args[0] == WORLD else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def data():
    d = None
    if RANK == 0:
        d = helpers.test_data(os.path.join(CACHE, "data"))
    box = [d]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@pytest.fixture
def shared_dir(request):
    """A fresh directory, the same on every rank."""
    box = [tempfile.mkdtemp(prefix=f"{request.node.name[:40]}-", dir=CACHE) if RANK == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@pytest.fixture
def reference():
    """reference(overrides) -> per-step losses of the same run as one plain process (computed by rank 0)."""
    def get(overrides):
        box = [helpers.reference_losses(CACHE, overrides) if RANK == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return get
