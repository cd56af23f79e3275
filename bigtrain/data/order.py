"""The global sample order. It depends on the data config and seed alone and is striped over K *lanes*: global
sample i is sample number i // K of lane i % K. A lane is an independent, deterministic stream: the source of
each of its samples is drawn by a counter-based hash of (seed, lane, sample number) with the sources' weights
(`blend_draws`), and within a source, lane l reads in epoch e the shards perm_e[l::K] (perm_e: a seeded
permutation of that source's shards, see members.Cursor), member after member.

Data-parallel rank r of D takes the global samples i with i % D == r; a step's batch is its share of
[step * G, (step + 1) * G) (`step_rows`). A lane's state is its sample counter and, per source, (epoch, shard
index in the lane's list, members started in that shard, samples taken from the last started member), plus its
member counters for the skip limit.
"""
from __future__ import annotations

import numpy as np

from .members import M64, Counters, Cursor
from .sources import Source
from .words import with_source


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (uint64 in, uint64 out)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def blend_draws(seed: int, lane: int, start: int, n: int, weights) -> np.ndarray:
    """Source index of lane samples start..start+n-1: a counter-based hash of (seed, lane, sample number)."""
    key = int(_mix(np.array([seed & M64], np.uint64))[0])
    key = int(_mix(np.array([key ^ lane], np.uint64))[0])
    z = np.arange(start + 1, start + n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)
    u = (_mix(z) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    w = np.asarray(weights, np.float64)
    return np.searchsorted(np.cumsum(w)[:-1] / w.sum(), u, side="right")


def initial_lane_state(n_sources: int) -> dict:
    return {"n": 0, "pos": [[0, 0, 0, 0] for _ in range(n_sources)], "seen": 0, "skipped": 0, "last_bad": ""}


class Lane:
    def __init__(self, lane: int, sources: list[Source], K: int, seed: int, state: dict, sample_len: int,
                 vocab_size: int, shuffle: bool = True):
        self.lane, self.seed, self.n, self.sample_len = lane, seed, state["n"], sample_len
        self.weights = [s.weight for s in sources]
        self.ctx = Counters(state["seen"], state["skipped"], state["last_bad"])
        self.cursors = [Cursor(s, i, lane, K, seed, shuffle, p, self.ctx, sample_len, vocab_size)
                        for i, (s, p) in enumerate(zip(sources, state["pos"]))]

    def take(self, n: int) -> np.ndarray:
        if len(self.cursors) == 1:
            rows = self.cursors[0].take(n)
        else:
            d = blend_draws(self.seed, self.lane, self.n, n, self.weights)
            parts = [(d == s, self.cursors[s].take(int((d == s).sum()))) for s in np.unique(d)]
            rows = np.empty((n, parts[0][1].shape[1]), np.result_type(*[p.dtype for _, p in parts]))
            for mask, p in parts:
                rows[mask] = p
            rows = with_source(rows, d)  # each row's source index rides in its words (data/words.py)
        self.n += n
        return rows

    def state(self) -> dict:
        c = self.ctx
        return {"n": self.n, "pos": [cu.position() for cu in self.cursors], "seen": c.seen, "skipped": c.skipped,
                "last_bad": c.last_bad}

    def close(self):
        for c in self.cursors:
            c.close()


def step_rows(lane: Lane, K: int, D: int, r: int, a: int, G: int):
    """The lane's part of the global window [a, a + G): rows rank r keeps and their rows in its batch."""
    i = np.arange(a + (lane.lane - a) % K, a + G, K)
    if not len(i):  # a batch smaller than the lane count
        return np.empty((0, lane.sample_len), np.int64), i
    if lane.n != i[0] // K:
        raise RuntimeError(f"lane {lane.lane}: counter {lane.n} out of step with global index {i[0]} (a bug)")
    rows = lane.take(len(i))
    keep = i % D == r
    if not keep.all():
        rows, i = rows[keep], i[keep]
    return rows, (i - a) // D


def produce(spec: dict, lanes: list[int], states: dict, a: int):
    """Per step: [(lane, rows, batch positions, lane state after)] for `lanes` of this rank."""
    objs = [Lane(l, spec["sources"], spec["K"], spec["seed"], states[l], spec["sample_len"], spec["vocab_size"],
                  spec["shuffle"]) for l in lanes]
    try:
        while True:
            yield [(ln.lane, *step_rows(ln, spec["K"], spec["D"], spec["r"], a, spec["G"]), ln.state()) for ln in objs]
            a += spec["G"]
    finally:
        for ln in objs:
            ln.close()
