"""The training stream: this data-parallel rank's share of each global batch of the blended, laned sample
sequence (order.py), read in the trainer or in worker processes (workers.py), with its state.

When the data-parallel size D divides the lane count K, rank r reads only the lanes l with l % D == r (disjoint
shards); otherwise every rank reads every lane and drops the samples of other ranks. The state is every lane's
(order.py); `state_dict()` gathers it over the data-parallel group, and a state saved under one DP size
restarts under any other: each lane reopens its shard, skips the members before it without decoding them, and
continues.

What the trainer relies on:
    next_batch()            this rank's rows of the next global batch: int64 [global_batch / D, seq_len + 1]
    index                   global index of the next batch's first sample (batches read = index // global_batch)
    state_dict()            the whole stream's position, identical on every rank (collective over DP)
    load_state_dict(state)  continue from a state taken under any DP size
    close()                 stop background readers
"""
from __future__ import annotations

import logging
import multiprocessing

import numpy as np

from ..errors import BigtrainError
from .members import check_skips
from .order import initial_lane_state, produce
from .sources import DataPlan, Source, check_data
from .workers import from_worker, worker

log = logging.getLogger("bigtrain.data")
STATE_FORMAT = "bigtrain-loader-state"


class TokenStream:
    """This rank's share of each global batch of the blended, laned sample sequence."""

    def __init__(self, sources: list[Source], *, seq_len: int, vocab_size: int, global_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, lanes: int = 1, seed: int = 0, num_workers: int = 0, max_skip_fraction: float = 0.01,
                 shuffle: bool = True):
        if global_batch % dp_size:
            raise BigtrainError(f"train.global_batch_size={global_batch} is not a multiple of the data-parallel size {dp_size}")
        self.sources, self.K, self.seed, self.G, self.D, self.r = sources, lanes, seed, global_batch, dp_size, dp_rank
        self.sample_len, self.num_workers, self.max_skip_fraction = seq_len + 1, num_workers, max_skip_fraction
        self.spec = dict(sources=sources, K=lanes, seed=seed, D=dp_size, r=dp_rank, G=global_batch,
                         sample_len=seq_len + 1, vocab_size=vocab_size, shuffle=shuffle)
        self.lanes = [l for l in range(lanes) if l % dp_size == dp_rank] if lanes % dp_size == 0 else list(range(lanes))
        self.index = 0  # global index of the next batch's first sample
        self.lane_states = {l: initial_lane_state(len(sources)) for l in self.lanes}
        self._producers, self._procs, self._last_bad = None, [], ""

    # -- reading
    def _start(self):
        states = {l: self.lane_states[l] for l in self.lanes}
        if self.num_workers <= 0:
            self._producers = [produce(self.spec, self.lanes, states, self.index)]
            return
        # forkserver: workers are forked from a clean server process that imported this module once (safe with
        # CUDA and threads in the trainer; restarts after load_state_dict are cheap)
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        W = min(self.num_workers, len(self.lanes))
        self._stop = ctx.Event()
        self._producers = []
        for w in range(W):
            q = ctx.Queue(maxsize=4)
            p = ctx.Process(target=worker, args=(self.spec, self.lanes[w::W], states, self.index, q, self._stop),
                            daemon=True, name=f"bigtrain-data-{self.r}-{w}")
            p.start()
            self._procs.append((p, q))
            self._producers.append(from_worker(q, p))

    def next_batch(self):
        import torch
        if self._producers is None:
            self._start()
        out = np.empty((self.G // self.D, self.sample_len), np.int64)
        for producer in self._producers:
            for lane, rows, pos, state in next(producer):
                out[pos] = rows
                if state["skipped"] > self.lane_states[lane]["skipped"]:
                    self._last_bad = state["last_bad"]
                self.lane_states[lane] = state
        self.index += self.G
        check_skips(self.lane_states.values(), self.max_skip_fraction, self._last_bad)
        return torch.from_numpy(out)

    def close(self) -> None:
        if self._procs:
            self._stop.set()
            for p, q in self._procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.terminate()
                    p.join()
                q.close()
                q.cancel_join_thread()
        elif self._producers:
            for g in self._producers:
                g.close()
        self._producers, self._procs = None, []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- state
    def _header(self) -> dict:
        return {"format": STATE_FORMAT, "version": 1, "seed": self.seed, "lanes": self.K, "index": self.index,
                "sources": [{"name": s.name, "path": s.path, "weight": s.weight, "shards": len(s.urls)}
                            for s in self.sources]}

    def local_state(self) -> dict:
        """This rank's lanes' positions (what it has consumed); `merge_states` of every rank's is the global state."""
        return {**self._header(), "lane_state": {str(l): self.lane_states[l] for l in self.lanes}}

    def state_dict(self) -> dict:
        """The global state (all lanes), gathered over the data-parallel group; collective."""
        local = self.local_state()
        if self.D == 1:
            return merge_states([local])
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("state_dict() with dp_size > 1 needs torch.distributed; without it, merge the "
                               "ranks' local_state() with merge_states()")
        group = None
        try:
            from megatron.core import parallel_state
            if parallel_state.model_parallel_is_initialized():
                group = parallel_state.get_data_parallel_group()
        except ImportError:
            pass
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, local, group=group)
        return merge_states(states)

    def load_state_dict(self, state: dict) -> None:
        """Continue the global sequence from a `state_dict()` taken under any data-parallel size."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise BigtrainError("data loader state: not a bigtrain loader state")
        mine = self._header()
        for key in ("lanes", "seed"):
            if state[key] != mine[key]:
                what = "data.lanes" if key == "lanes" else "train.seed"
                raise BigtrainError(f"data loader state: saved with {key}={state[key]}, the config gives {mine[key]} "
                                    f"(set {what}={state[key]} to continue that data order)")
        saved, now = state["sources"], mine["sources"]
        if len(saved) != len(now):
            raise BigtrainError(f"data loader state: saved with {len(saved)} sources "
                                f"({', '.join(s['name'] for s in saved)}), data.sources has {len(now)}")
        for i, (a, b) in enumerate(zip(saved, now)):
            for key in ("name", "path", "weight", "shards"):
                if a[key] != b[key]:
                    raise BigtrainError(f"data loader state: source {i} ('{b['name']}') has {key} {b[key]!r}, the "
                                        f"checkpoint has {a[key]!r}")
        lanes = state["lane_state"]
        index = state["index"]
        for l, st in enumerate(lanes):
            if st["n"] != (index - l + self.K - 1) // self.K or len(st["pos"]) != len(now):
                raise BigtrainError(f"data loader state: lane {l} is inconsistent with global index {index}")
        self.close()
        self.index = index
        self.lane_states = {l: lanes[l] for l in self.lanes}


def merge_states(states: list[dict]) -> dict:
    """The global state from the ranks' `local_state()`s (any order; lanes read by several ranks must agree)."""
    head = {k: v for k, v in states[0].items() if k != "lane_state"}
    lanes = {}
    for s in states:
        if {k: v for k, v in s.items() if k != "lane_state"} != head:
            raise BigtrainError("data loader states: the ranks' states disagree on the stream (seed, lanes, index or sources)")
        for l, st in s["lane_state"].items():
            if lanes.setdefault(int(l), st) != st:
                raise BigtrainError(f"data loader states: the ranks disagree on lane {l}")
    missing = sorted(set(range(head["lanes"])) - set(lanes))
    if missing:
        raise BigtrainError(f"data loader states: no rank holds lanes {missing}")
    return {**head, "lane_state": [lanes[l] for l in range(head["lanes"])]}


def build_train_source(cfg, dp_rank: int = 0, dp_size: int = 1, plan: DataPlan | None = None) -> TokenStream:
    """This data-parallel rank's training stream (`plan`: the config's checked data, checked here if not given)."""
    plan = plan or check_data(cfg)
    sources, K = plan.sources, plan.lanes
    if K % dp_size:
        log.warning("data: %d lanes are not a multiple of the data-parallel size %d: every rank reads every lane "
                    "(correct but slower; set data.lanes to a multiple of %d)", K, dp_size, dp_size)
    return TokenStream(sources, seq_len=cfg.model.seq_length, vocab_size=cfg.model.vocab_size,
                       global_batch=cfg.train.global_batch_size, dp_rank=dp_rank, dp_size=dp_size, lanes=K,
                       seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                       max_skip_fraction=cfg.data.max_skip_fraction)
