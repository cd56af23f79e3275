"""`bigtrain plan`'s per-rank state bytes (parameters, gradients, optimizer state under the layout's ZeRO stage
and precision) against what each rank's DeepSpeed engine holds in a real run: within 5% on every rank."""
import pytest

import helpers


def _check(case, data, shared_dir):
    rows = helpers.plan_vs_measured(data, shared_dir, case)
    for row in rows:
        assert abs(row["measured"] - row["plan"]) <= 0.05 * row["plan"], row


@pytest.mark.world(2)
@pytest.mark.parametrize("case", helpers.PLAN_LAYOUTS[2], ids=lambda c: "-".join(c))
def test_plan_state_bytes_match_2(case, data, shared_dir):
    _check(case, data, shared_dir)


@pytest.mark.world(4)
@pytest.mark.parametrize("case", helpers.PLAN_LAYOUTS[4], ids=lambda c: "-".join(c))
def test_plan_state_bytes_match_4(case, data, shared_dir):
    _check(case, data, shared_dir)
