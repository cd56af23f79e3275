"""`bigtrain plan`'s per-rank state bytes against a real one-process run (the 2- and 4-rank layouts are in
tests/dist/test_plan_memory.py): within 5%."""
import pytest

import helpers


@pytest.mark.parametrize("case", helpers.PLAN_LAYOUTS[1], ids=lambda c: "-".join(c))
def test_plan_state_bytes_match_one_process(case, data, tmp_path):
    for row in helpers.plan_vs_measured(data, str(tmp_path / "run"), case):
        assert abs(row["measured"] - row["plan"]) <= 0.05 * row["plan"], row
