"""Reading one source's shards: `.npy` members out of WebDataset tars (the bytes from remote.py, the members
through webdataset's tar iterator), each checked against its `.npy.xxh3` checksum, its shape and the vocabulary;
a `Cursor` is one lane's position in one source (which shards it reads in which epoch, how far it is in the
current one) and resumes there without decoding the members before it. Unreadable, corrupt or truncated members
are skipped and counted (`Counters`); a lost shard counts the members the manifest says it had left (one without
a manifest).
"""
from __future__ import annotations

import io
import logging

import numpy as np
from webdataset.tariterators import tar_file_iterator

from ..errors import BigtrainError
from .remote import ReadOptions, open_shard
from .shards import member_digest
from .sources import Source
from .words import ID_MASK

log = logging.getLogger("bigtrain.data")
M64 = (1 << 64) - 1
SKIP_FLOOR = 1000  # members: the skip fraction is taken of at least this many


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


def tar_members(url: str, reading: ReadOptions):
    """(name, bytes, digest) of the `.npy` members of one shard, read by webdataset's tar iterator from the
    shard's stream (remote.py); `digest` is the member's `.npy.xxh3` companion (None when the shard has none).
    After the last member the shard must prove whole (all bytes, exit status 0, the tar's end blocks)."""
    stream = open_shard(url, reading)
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
        stream.finish()
    finally:
        stream.close()


class Counters:
    """Members read and skipped by one lane (checked against data.max_skip_fraction)."""

    def __init__(self, seen=0, skipped=0, last_bad=""):
        self.seen, self.skipped, self.last_bad = seen, skipped, last_bad

    def bad(self, where: str, why, count: int = 1) -> None:
        self.seen += count
        self.skipped += count
        self.last_bad = where
        log.warning("data: skipped %s: %s", where, why)


class Cursor:
    """One lane's position in one source."""

    def __init__(self, src: Source, si: int, lane: int, K: int, seed: int, shuffle: bool, pos, ctx: Counters,
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
            order = (np.random.default_rng([self.seed & M64, self.si, self.epoch]).permutation(n) if self.shuffle
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
                self.members = tar_members(url, self.src.reading)
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
        if len(block) and np.iinfo(block.dtype).max >= self.vocab_size:
            ids = block & ID_MASK if block.dtype.itemsize >= 4 else block  # token words: flags above the id bits
            if (top := int(ids.max())) >= self.vocab_size:
                raise BigtrainError(f"{url} member {name}: token id {top} >= model.vocab_size={self.vocab_size}")
        if not len(block):
            return False
        self.block = block
        return True


def check_skips(states, fraction: float, last_bad: str) -> None:
    """Stop once skipped members exceed `fraction` of the members seen, counted as at least SKIP_FLOOR so that
    a few bad members at the start of a run do not stop it."""
    seen = sum(s["seen"] for s in states)
    skipped = sum(s["skipped"] for s in states)
    if skipped > fraction * max(seen, SKIP_FLOOR):
        raise BigtrainError(f"skipped {skipped} of {seen} shard members read so far ({skipped / max(seen, 1):.1%}), "
                            f"more than data.max_skip_fraction={fraction}; last bad: {last_bad}")
