"""The global sample order and the loader state, as pure functions: blend draws, lane striping, state merging."""
import numpy as np
import pytest

from bigtrain.data.order import blend_draws, initial_lane_state
from bigtrain.data.stream import merge_states
from bigtrain.errors import BigtrainError


def test_blend_draws_are_a_function_of_seed_lane_and_position():
    a = blend_draws(7, 3, 0, 1000, [1.0, 3.0])
    assert (a == blend_draws(7, 3, 0, 1000, [1.0, 3.0])).all()
    assert (a[500:] == blend_draws(7, 3, 500, 500, [1.0, 3.0])).all()  # counter-based: resumable anywhere
    assert not (a == blend_draws(8, 3, 0, 1000, [1.0, 3.0])).all() and not (a == blend_draws(7, 4, 0, 1000, [1, 3])).all()


def test_blend_draws_follow_the_weights():
    d = blend_draws(1, 0, 0, 200_000, [1.0, 2.0, 7.0])
    share = np.bincount(d, minlength=3) / len(d)
    assert np.allclose(share, [0.1, 0.2, 0.7], atol=0.005)
    assert (blend_draws(1, 0, 0, 100, [1.0]) == 0).all()


def _state(lanes, index, owned):
    head = {"format": "bigtrain-loader-state", "version": 1, "seed": 0, "lanes": lanes, "index": index, "sources": []}
    return {**head, "lane_state": {str(l): {**initial_lane_state(1), "n": index // lanes} for l in owned}}


def test_merge_states_needs_every_lane_once_and_agreement():
    merged = merge_states([_state(4, 8, [1, 3]), _state(4, 8, [0, 2])])
    assert [s["n"] for s in merged["lane_state"]] == [2, 2, 2, 2]
    with pytest.raises(BigtrainError, match=r"no rank holds lanes \[3\]"):
        merge_states([_state(4, 8, [0, 1, 2])])
    with pytest.raises(BigtrainError, match="disagree on the stream"):
        merge_states([_state(4, 8, [0, 1]), _state(4, 12, [2, 3])])


class _Lane:
    """What step_rows reads of a lane: its number, counter, sample length and next samples (row = global index)."""

    def __init__(self, lane, K):
        self.lane, self.K, self.n, self.sample_len = lane, K, 0, 3

    def take(self, n):
        rows = np.array([[(self.n + j) * self.K + self.lane] * self.sample_len for j in range(n)])
        self.n += n
        return rows


@pytest.mark.parametrize("K, D, G", [(4, 2, 8), (4, 1, 8), (3, 2, 4), (8, 4, 4), (2, 3, 6)])
def test_step_rows_give_each_rank_its_samples_in_global_order(K, D, G):
    from bigtrain.data.order import step_rows
    lanes = {r: [_Lane(l, K) for l in range(K)] for r in range(D)}
    for a in range(0, 5 * G, G):  # five consecutive global batches
        seen = []
        for r in range(D):
            batch = np.full((G // D, 3), -1)
            for lane in lanes[r]:
                rows, pos = step_rows(lane, K, D, r, a, G)
                batch[pos] = rows
            assert (batch >= 0).all()  # every slot of the rank's batch filled
            assert (batch[:, 0] % D == r).all() and (np.diff(batch[:, 0]) > 0).all()  # its samples, in order
            seen += batch[:, 0].tolist()
        assert sorted(seen) == list(range(a, a + G))  # the global window, each sample once


def test_lane_shards_partition_each_epoch():
    from bigtrain.data.members import Counters, Cursor
    from bigtrain.data.sources import Source
    src = Source("s", "/x", 1.0, [f"/x/{i}.tar" for i in range(10)])
    K = 3

    def shards(lane, epoch, shuffle=True, seed=5):
        return Cursor(src, 0, lane, K, seed, shuffle, (epoch, 0, 0, 0), Counters(), 4, 10).lane_shards().tolist()

    for epoch in (0, 1):
        parts = [shards(l, epoch) for l in range(K)]
        assert sorted(sum(parts, [])) == list(range(10))  # every shard once per epoch, lanes disjoint
    assert shards(0, 0) == shards(0, 0) and [shards(l, 0) for l in range(K)] != [shards(l, 1) for l in range(K)]
    assert shards(1, 0, shuffle=False) == [1, 4, 7]
