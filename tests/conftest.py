"""Test-suite layout.

- tests/unit: single-process tests (each may start real subprocesses: `bigtrain train`, torchrun, SLURM jobs).
- tests/dist: multi-rank tests. They run *inside* torchrun, one pytest session per world size
  (`torchrun --nproc_per_node N -m pytest tests/dist`), so process start-up and imports are paid once per
  world size; tests/test_distributed.py launches those sessions from the plain `pytest` run and fails with
  the names of the failing inner tests.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py

collect_ignore = [] if "RANK" in os.environ else ["dist"]

import pytest


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> str:
    """A directory shared with the torchrun sessions: test data and single-process reference losses are
    made once per pytest run."""
    return str(tmp_path_factory.mktemp("shared"))
