"""Streaming reader of token shards: weighted blending, data-parallel split, exact resume.

The global sample sequence depends on the data config and seed alone. It is striped over K *lanes*: global
sample i is sample number i // K of lane i % K. A lane is an independent, deterministic stream: the source of
each of its samples is drawn by a counter-based hash of (seed, lane, sample number) with the sources' weights,
and within a source, lane l reads in epoch e the shards perm_e[l::K] (perm_e: a seeded permutation of that
source's shards), member after member, moving to the next epoch when they are done.

Data-parallel rank r of D takes the global samples i with i % D == r; a step's batch is its share of
[step * G, (step + 1) * G). When D divides K, rank r reads only the lanes l with l % D == r (disjoint shards);
otherwise every rank reads every lane and drops the samples of other ranks. Loader workers each read a subset
of the rank's lanes, up to 4 steps ahead, and send each step's rows of a lane with the lane's state after them, so
the state the trainer saves is that of what it consumed.

The state is, per lane, its sample counter and per source (epoch, shard index in the lane's list, members
started in that shard, samples taken from the last started member), plus member counters for the skip
limit. Saved under one DP size it restarts under any other: each lane reopens its shard, skips the members
before it without decoding them, and continues.

A source is a directory with manifest.json (written by `bigtrain shards`) or a brace-expanded list of URLs /
`pipe:` commands read with webdataset's gopen. Without a manifest each URL is one shard of unknown size: member
shapes are checked as they are read, and a lane that reads a whole epoch of its shards of a source without
finding a sample stops the run.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import queue
import signal
import traceback
from dataclasses import dataclass, field

import braceexpand
import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_iterator

from ..errors import BigtrainError
from .shards import FORMAT, MANIFEST, member_digest

log = logging.getLogger(__name__)
STATE_FORMAT = "bigtrain-loader-state"
MAX_AUTO_LANES = 64
SKIP_FLOOR = 1000  # members: the skip fraction is taken of at least this many


# ---------------------------------------------------------------------------------------------- sources

@dataclass
class Source:
    name: str
    path: str
    weight: float
    urls: list[str]
    manifest: dict | None = None  # None for URL lists and pipe: commands
    members: list = field(default_factory=list)  # members per shard (None where unknown)


def open_source(path: str, name: str = "", weight: float = 1.0) -> Source:
    """A shard directory (manifest.json) or a brace-expanded URL list / `pipe:` command."""
    name = name or os.path.basename(path.rstrip("/")) or path
    if os.path.isdir(path):
        mpath = os.path.join(path, MANIFEST)
        try:
            with open(mpath) as f:
                m = json.load(f)
        except FileNotFoundError:
            raise BigtrainError(f"data source {path}: no {MANIFEST} (not a `bigtrain shards` output directory)") from None
        except (OSError, ValueError) as e:
            raise BigtrainError(f"{mpath}: unreadable ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise BigtrainError(f"{mpath}: not a bigtrain shard manifest (format {m.get('format') if isinstance(m, dict) else m!r})")
        missing = [k for k in ("seq_len", "vocab_size", "tokenizer", "shards") if k not in m]
        if missing:
            raise BigtrainError(f"{mpath}: manifest lacks {', '.join(missing)}")
        if not m["shards"]:
            raise BigtrainError(f"{mpath}: lists no shards")
        return Source(name, path, weight, [os.path.join(path, s["name"]) for s in m["shards"]], m,
                      [s["members"] for s in m["shards"]])
    urls = list(braceexpand.braceexpand(path))
    for u in urls:
        if ":" not in u.split("/")[0] and not os.path.exists(u):  # a local file (not pipe: or a URL scheme)
            raise BigtrainError(f"data source {path}: {u} does not exist")
    return Source(name, path, weight, urls, None, [None] * len(urls))


def check_sources(sources: list[Source], cfg, tokenizer=None) -> None:
    """Start-up checks of manifests against the config: seq_len, tokenizer (vocab size and sha256), token ids."""
    from .tokenizer import load_tokenizer
    if tokenizer is None and cfg.data.tokenizer:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    V = cfg.model.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > V:
        raise BigtrainError(f"data.tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than "
                            f"model.vocab_size={V}")
    for s in sources:
        m = s.manifest
        if m is None:
            continue
        mpath = os.path.join(s.path, MANIFEST)
        if m["seq_len"] != cfg.model.seq_length:
            raise BigtrainError(f"{mpath}: shards hold seq_len {m['seq_len']}, but model.seq_length is {cfg.model.seq_length}")
        if tokenizer is not None:
            if m["vocab_size"] != tokenizer.vocab_size:
                raise BigtrainError(f"{mpath}: vocab_size {m['vocab_size']} differs from data.tokenizer "
                                    f"{tokenizer.path} ({tokenizer.vocab_size})")
            if m["tokenizer"]["sha256"] != tokenizer.sha256:
                raise BigtrainError(f"{mpath}: written with tokenizer {m['tokenizer']['file'] or '?'} (sha256 "
                                    f"{m['tokenizer']['sha256'][:12] or 'none'}), not data.tokenizer {tokenizer.path} "
                                    f"(sha256 {tokenizer.sha256[:12]})")
        for sh in m["shards"]:
            if sh["max_token_id"] >= V:
                raise BigtrainError(f"{os.path.join(s.path, sh['name'])}: holds token id {sh['max_token_id']} >= "
                                    f"model.vocab_size={V}")


def _config_sources(cfg) -> list[Source]:
    if not cfg.data.sources:
        raise BigtrainError("data.sources is empty: give at least one shard directory or URL list")
    return [open_source(s.path, s.name, s.weight) for s in cfg.data.sources]


def check_manifest(cfg) -> None:
    """Every start-up check of the data config (sources, validation, tokenizer) without reading any shard."""
    sources = _config_sources(cfg) + ([open_source(cfg.data.validation)] if cfg.data.validation else [])
    check_sources(sources, cfg)
    num_lanes(cfg, sources[:len(cfg.data.sources)])


def num_lanes(cfg, sources: list[Source]) -> int:
    K = cfg.data.lanes or max(1, min(MAX_AUTO_LANES, min(len(s.urls) for s in sources)))
    for s in sources:
        if len(s.urls) < K:
            raise BigtrainError(f"data source '{s.name}' ({s.path}) has {len(s.urls)} shards, fewer than the "
                                f"{K} lanes of data.lanes={cfg.data.lanes}: set data.lanes <= {len(s.urls)} (or 0) "
                                f"or write more shards (bigtrain shards --shard-samples)")
    return K


# ---------------------------------------------------------------------------------------------- reading

_HEADERS: dict[bytes, tuple] = {}


def decode_npy(data: bytes) -> np.ndarray:
    """A 2-D integer array from .npy bytes without copying the payload; each distinct header is parsed once."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy array (bad magic)")
    end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    head = bytes(data[:end])
    info = _HEADERS.get(head)
    if info is None:
        f = io.BytesIO(head)
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0)(f)
        if fortran or len(shape) != 2 or dtype.kind not in "ui":
            raise ValueError(f"expected a 2-D C-order integer array, got {dtype} {shape}")
        if len(_HEADERS) > 4096:
            _HEADERS.clear()
        info = _HEADERS[head] = (shape, dtype, end)
    shape, dtype, end = info
    if len(data) - end != shape[0] * shape[1] * dtype.itemsize:
        raise ValueError(f"payload of {len(data) - end} bytes, header says {shape} {dtype}")
    return np.frombuffer(data, dtype, shape[0] * shape[1], end).reshape(shape)


def tar_members(url: str):
    """(name, bytes, digest) of the `.npy` members of one shard, through webdataset's gopen and tar iterator;
    `digest` is the member's `.npy.xxh3` companion (None when the shard has none)."""
    stream = gopen(url)
    done = False
    try:
        pending = None
        for f in tar_file_iterator(stream):
            name = f["fname"]
            if pending is not None and name == pending[0] + ".xxh3":
                yield pending[0], pending[1], bytes(f["data"]).decode("ascii", "replace").strip()
                pending = None
                continue
            if pending is not None:
                yield pending[0], pending[1], None
                pending = None
            if name.endswith(".npy"):
                pending = (name, f["data"])
        if pending is not None:
            yield pending[0], pending[1], None
        done = True
    finally:
        try:
            stream.close()
        except Exception:
            if done:  # e.g. a pipe: command's exit status; when reading stopped early it is not of interest
                raise


class _Counters:
    """Members read and skipped by one lane (checked against data.max_skip_fraction)."""

    def __init__(self, seen=0, skipped=0, last_bad=""):
        self.seen, self.skipped, self.last_bad = seen, skipped, last_bad

    def bad(self, where: str, why, count: int = 1) -> None:
        self.seen += count
        self.skipped += count
        self.last_bad = where
        log.warning("data: skipped %s: %s", where, why)


class _Cursor:
    """One lane's position in one source."""

    def __init__(self, src: Source, si: int, lane: int, K: int, seed: int, shuffle: bool, pos, ctx: _Counters,
                 sample_len: int, vocab_size: int):
        self.src, self.si, self.lane, self.K, self.seed, self.shuffle = src, si, lane, K, seed, shuffle
        self.epoch, self.shard, self.member, self.offset = pos
        self.ctx, self.sample_len, self.vocab_size = ctx, sample_len, vocab_size
        self.block, self.members, self._perm = None, None, (None, None)
        self._resume = self.member > 0
        self.checked = bool((src.manifest or {}).get("member_checksum"))

    def position(self) -> list[int]:
        return [self.epoch, self.shard, self.member, self.offset]

    def lane_shards(self) -> np.ndarray:
        if self._perm[0] != self.epoch:
            n = len(self.src.urls)
            order = (np.random.default_rng([self.seed & _M64, self.si, self.epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._perm = (self.epoch, order[self.lane::self.K])
        return self._perm[1]

    def take(self, n: int) -> np.ndarray:
        """The next n samples [n, seq_len + 1]."""
        parts = []
        while n:
            if self.block is None or self.offset >= len(self.block):
                self._next_block()
            k = min(n, len(self.block) - self.offset)
            parts.append(self.block[self.offset:self.offset + k])
            self.offset += k
            n -= k
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self):
        if self.members is not None:
            self.members.close()
            self.members = None

    def _next_block(self) -> None:
        wraps = 0
        while True:
            url = self.src.urls[int(self.lane_shards()[self.shard])]
            if self.members is None:
                self.members = tar_members(url)
                if self._resume and self._restart(url):
                    return
            if self.members is not None and self._load(url):
                return
            if self.members is None:  # the shard is done: the next one; the next epoch after the last
                self.shard, self.member, self.offset = self.shard + 1, 0, 0
                if self.shard == len(self.lane_shards()):
                    self.epoch, self.shard, wraps = self.epoch + 1, 0, wraps + 1
                    if wraps > 1:
                        raise BigtrainError(f"data source '{self.src.name}' ({self.src.path}): lane {self.lane} "
                                            f"found no readable sample in its {len(self.lane_shards())} shards")

    def _restart(self, url: str) -> bool:
        """Go back to a saved (member, offset) in a freshly opened shard: skip the members before, undecoded."""
        self._resume, target, offset = False, self.member, self.offset
        self.member = self.offset = 0
        for _ in range(target - (offset > 0)):
            if self._read(url) is None:
                return False
        if offset == 0:
            return False
        self.ctx.seen -= 1  # that member was counted before the save
        if not self._load(url):
            return False
        self.offset = min(offset, len(self.block))
        return True

    def _read(self, url: str):
        """The next member's (name, bytes), or None at the end of the shard (then the shard is closed)."""
        expected = self.src.members[int(self.lane_shards()[self.shard])]
        try:
            item = next(self.members, None)
        except Exception as e:  # truncated or unreadable: the rest of the shard is lost
            item = None
            lost = max(1, (expected or 0) - self.member)
            self.ctx.bad(f"{url} (from member {self.member})", f"{type(e).__name__}: {e}", lost)
            self.member += lost
        if item is None:
            if expected is not None and self.member < expected:
                self.ctx.bad(f"{url} (members {self.member}..{expected - 1})", "shard ended early",
                             expected - self.member)
            self.close()
            return None
        self.member += 1
        self.offset = 0
        return item

    def _load(self, url: str) -> bool:
        """Decode the next member into self.block; False at the end of the shard or for a bad member."""
        item = self._read(url)
        if item is None:
            return False
        name, data, digest = item
        if digest is None and self.checked:
            self.ctx.bad(f"{url} member {name}", "no .npy.xxh3 checksum beside it (the manifest promises one)")
            return False
        if digest is not None and (got := member_digest(data)) != digest:
            self.ctx.bad(f"{url} member {name}", f"checksum mismatch (xxh3_64 {got}, expected {digest[:16]}): corrupt")
            return False
        try:
            block = decode_npy(data)
        except ValueError as e:
            self.ctx.bad(f"{url} member {name}", e)
            return False
        self.ctx.seen += 1
        if block.shape[1] != self.sample_len:
            raise BigtrainError(f"{url} member {name}: samples of {block.shape[1]} ids, expected model.seq_length + 1 "
                                f"= {self.sample_len}")
        if len(block) and np.iinfo(block.dtype).max >= self.vocab_size and (top := int(block.max())) >= self.vocab_size:
            raise BigtrainError(f"{url} member {name}: token id {top} >= model.vocab_size={self.vocab_size}")
        if not len(block):
            return False
        self.block = block
        return True


# ---------------------------------------------------------------------------------------------- lanes

_M64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (uint64 in, uint64 out)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def blend_draws(seed: int, lane: int, start: int, n: int, weights) -> np.ndarray:
    """Source index of lane samples start..start+n-1: a counter-based hash of (seed, lane, sample number)."""
    key = int(_mix(np.array([seed & _M64], np.uint64))[0])
    key = int(_mix(np.array([key ^ lane], np.uint64))[0])
    z = np.arange(start + 1, start + n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)
    u = (_mix(z) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    w = np.asarray(weights, np.float64)
    return np.searchsorted(np.cumsum(w)[:-1] / w.sum(), u, side="right")


def initial_lane_state(n_sources: int) -> dict:
    return {"n": 0, "pos": [[0, 0, 0, 0] for _ in range(n_sources)], "seen": 0, "skipped": 0, "last_bad": ""}


class _Lane:
    def __init__(self, lane: int, sources: list[Source], K: int, seed: int, state: dict, sample_len: int,
                 vocab_size: int, shuffle: bool = True):
        self.lane, self.seed, self.n, self.sample_len = lane, seed, state["n"], sample_len
        self.weights = [s.weight for s in sources]
        self.ctx = _Counters(state["seen"], state["skipped"], state["last_bad"])
        self.cursors = [_Cursor(s, i, lane, K, seed, shuffle, p, self.ctx, sample_len, vocab_size)
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
        self.n += n
        return rows

    def state(self) -> dict:
        c = self.ctx
        return {"n": self.n, "pos": [cu.position() for cu in self.cursors], "seen": c.seen, "skipped": c.skipped,
                "last_bad": c.last_bad}

    def close(self):
        for c in self.cursors:
            c.close()


def _step_rows(lane: _Lane, K: int, D: int, r: int, a: int, G: int):
    """The lane's part of the global window [a, a + G): rows rank r keeps and their rows in its batch."""
    i = np.arange(a + (lane.lane - a) % K, a + G, K)
    if not len(i):  # a batch smaller than the lane count
        return np.empty((0, lane.sample_len), np.int64), i
    assert lane.n == i[0] // K, "lane counter out of step with the global index"
    rows = lane.take(len(i))
    keep = i % D == r
    if not keep.all():
        rows, i = rows[keep], i[keep]
    return rows, (i - a) // D


def _produce(spec: dict, lanes: list[int], states: dict, a: int):
    """Per step: [(lane, rows, batch positions, lane state after)] for `lanes` of this rank."""
    objs = [_Lane(l, spec["sources"], spec["K"], spec["seed"], states[l], spec["sample_len"], spec["vocab_size"],
                  spec["shuffle"]) for l in lanes]
    try:
        while True:
            yield [(ln.lane, *_step_rows(ln, spec["K"], spec["D"], spec["r"], a, spec["G"]), ln.state()) for ln in objs]
            a += spec["G"]
    finally:
        for ln in objs:
            ln.close()


def _worker(spec, lanes, states, a, q, stop):
    # SLURM signals every process of the job step (time limit, preemption): the trainer acts on them and
    # stops its workers itself; a worker killed by one would end the run without its checkpoint
    for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    try:
        for msg in _produce(spec, lanes, states, a):
            while not stop.is_set():
                try:
                    q.put(msg, timeout=0.2)
                    break
                except queue.Full:
                    pass
            else:
                q.cancel_join_thread()  # stopping: what is still queued may be dropped
                return
    except BigtrainError as e:
        q.put(("error", str(e), True))
    except BaseException:
        q.put(("error", traceback.format_exc(), False))


def _from_worker(q, proc):
    while True:
        try:
            msg = q.get(timeout=2)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"data loader worker {proc.pid} died (exit code {proc.exitcode})") from None
            continue
        if isinstance(msg, tuple):
            raise BigtrainError(msg[1]) if msg[2] else RuntimeError(f"data loader worker failed:\n{msg[1]}")
        yield msg


# ---------------------------------------------------------------------------------------------- the stream

class TokenStream:
    """A `BatchSource`: this rank's share of each global batch of the blended, laned sample sequence."""

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
            self._producers = [_produce(self.spec, self.lanes, states, self.index)]
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
            p = ctx.Process(target=_worker, args=(self.spec, self.lanes[w::W], states, self.index, q, self._stop),
                            daemon=True, name=f"bigtrain-data-{self.r}-{w}")
            p.start()
            self._procs.append((p, q))
            self._producers.append(_from_worker(q, p))

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
        _check_skips(self.lane_states.values(), self.max_skip_fraction, self._last_bad)
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


def _check_skips(states, fraction: float, last_bad: str) -> None:
    """Stop once skipped members exceed `fraction` of the members seen, counted as at least SKIP_FLOOR so that
    a few bad members at the start of a run do not stop it."""
    seen = sum(s["seen"] for s in states)
    skipped = sum(s["skipped"] for s in states)
    if skipped > fraction * max(seen, SKIP_FLOOR):
        raise BigtrainError(f"skipped {skipped} of {seen} shard members read so far ({skipped / max(seen, 1):.1%}), "
                            f"more than data.max_skip_fraction={fraction}; last bad: {last_bad}")


def merge_states(states: list[dict]) -> dict:
    """The global state from the ranks' `local_state()`s (any order; lanes read by several ranks must agree)."""
    head = {k: v for k, v in states[0].items() if k != "lane_state"}
    lanes = {}
    for s in states:
        if {k: v for k, v in s.items() if k != "lane_state"} != head:
            raise ValueError("merge_states: the ranks' states disagree on the stream (seed, lanes, index or sources)")
        for l, st in s["lane_state"].items():
            if lanes.setdefault(int(l), st) != st:
                raise ValueError(f"merge_states: ranks disagree on lane {l}")
    missing = sorted(set(range(head["lanes"])) - set(lanes))
    if missing:
        raise ValueError(f"merge_states: no rank holds lanes {missing}")
    return {**head, "lane_state": [lanes[l] for l in range(head["lanes"])]}


# ---------------------------------------------------------------------------------------------- validation

class ValidationSource:
    """The held-out shards in plain order (one lane, no blend), split over data-parallel ranks like training;
    `batches(n)` always starts from the beginning, so every evaluation sees the same samples."""

    def __init__(self, source: Source, *, seq_len: int, vocab_size: int, global_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, max_skip_fraction: float = 0.01):
        if global_batch % dp_size:
            raise BigtrainError(f"train.global_batch_size={global_batch} is not a multiple of the data-parallel size {dp_size}")
        self.source, self.G, self.D, self.r = source, global_batch, dp_size, dp_rank
        self.sample_len, self.vocab_size, self.max_skip_fraction = seq_len + 1, vocab_size, max_skip_fraction

    def batches(self, n: int):
        import torch
        spec = dict(sources=[self.source], K=1, seed=0, D=self.D, r=self.r, G=self.G, sample_len=self.sample_len,
                    vocab_size=self.vocab_size, shuffle=False)
        producer = _produce(spec, [0], {0: initial_lane_state(1)}, 0)
        try:
            for _ in range(n):
                out = np.empty((self.G // self.D, self.sample_len), np.int64)
                ((_, rows, pos, state),) = next(producer)
                out[pos] = rows
                _check_skips([state], self.max_skip_fraction, state["last_bad"])
                yield torch.from_numpy(out)
        finally:
            producer.close()


# ---------------------------------------------------------------------------------------------- builders

def build_train_source(cfg, dp_rank: int = 0, dp_size: int = 1) -> TokenStream:
    """The training `BatchSource` of data-parallel rank `dp_rank` of `dp_size`, after the start-up checks."""
    sources = _config_sources(cfg)
    check_sources(sources, cfg)
    K = num_lanes(cfg, sources)
    if K % dp_size:
        log.warning("data: %d lanes are not a multiple of the data-parallel size %d: every rank reads every lane "
                    "(correct but slower; set data.lanes to a multiple of %d)", K, dp_size, dp_size)
    return TokenStream(sources, seq_len=cfg.model.seq_length, vocab_size=cfg.model.vocab_size,
                       global_batch=cfg.train.global_batch_size, dp_rank=dp_rank, dp_size=dp_size, lanes=K,
                       seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                       max_skip_fraction=cfg.data.max_skip_fraction)


def build_validation_source(cfg, dp_rank: int = 0, dp_size: int = 1) -> ValidationSource | None:
    """The validation source of this rank, or None when data.validation is empty."""
    if not cfg.data.validation:
        return None
    source = open_source(cfg.data.validation, "validation")
    check_sources([source], cfg)
    return ValidationSource(source, seq_len=cfg.model.seq_length, vocab_size=cfg.model.vocab_size,
                            global_batch=cfg.train.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                            max_skip_fraction=cfg.data.max_skip_fraction)
