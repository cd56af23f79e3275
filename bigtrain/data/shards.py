"""`bigtrain shards`: text -> WebDataset tar shards of packed token sequences + manifest.json.

Documents are tokenized in a process pool (results taken in input order, so the output is byte-identical for
the same input whatever the worker count), joined with EOS and cut into samples of exactly seq_len + 1 ids (the
trailing partial sample is dropped and counted). Shard `DIR/shard-NNNNNN.tar` holds `shard_samples` samples as
members `{key}.npy`, each a 2-D array [<= samples_per_member, seq_len + 1] of the smallest unsigned dtype that
holds the vocabulary, each followed by `{key}.npy.xxh3`, the hex xxh3-64 digest of the .npy bytes (the loader
skips, counts and names a member whose bytes no longer match); `key` is the zero-padded global member index.
Plain WebDataset reads them: `webdataset.WebDataset(urls).decode()` yields dicts whose "npy" is that array.
Tars are deterministic (mtime 0, uid/gid 0, no user/group names, sorted members); each is written under a
temporary name and renamed, and manifest.json (with each shard's sha256) comes last.
"""
from __future__ import annotations

import collections
import hashlib
import io
import multiprocessing
import os
import sys

import numpy as np

from ..atomic import atomic_path, write_json
from ..errors import BigtrainError
from .inputs import init_worker, plan_tasks, run_task
from .tokenizer import expand_inputs, load_tokenizer
from .words import unpack

MANIFEST = "manifest.json"
FORMAT = "bigtrain-token-shards"
VERSION = 1
MEMBER_CHECKSUM = "xxh3_64"   # the digest in each member's `.npy.xxh3` companion (manifest key member_checksum)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id < vocab_size."""
    return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def npy_bytes(a: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)
    return f.getvalue()


def member_digest(data) -> str:
    import xxhash
    return xxhash.xxh3_64(data).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Packs token arrays into samples of seq_len + 1 ids and writes them as shards; `close()` writes the
    manifest. Used by `write_shards` and by tools/bench_data.py (random tokens). `token_flags=True`: uint32 token
    words (bigtrain.data.words: ids with loss-mask and document flags), added as whole samples (data/chat.py)."""

    def __init__(self, output: str, seq_len: int, vocab_size: int, samples_per_member: int = 64,
                 shard_samples: int = 8192, eos_id: int | None = None, tokenizer: dict | None = None,
                 token_flags: bool = False):
        for key, v in (("--seq-len", seq_len), ("--samples-per-member", samples_per_member),
                       ("--shard-samples", shard_samples)):
            if v < 1:
                raise BigtrainError(f"{key}: expected a positive integer, got {v}")
        if os.path.exists(os.path.join(output, MANIFEST)):
            raise BigtrainError(f"{output} already holds shards ({MANIFEST} exists): choose a new output directory "
                                "or delete it")
        os.makedirs(output, exist_ok=True)
        self.output, self.sample_len, self.spm, self.shard_samples = output, seq_len + 1, samples_per_member, shard_samples
        self.token_flags = token_flags  # uint32 token words (bigtrain.data.words) with loss-mask/document flags
        self.dtype = np.dtype(np.uint32) if token_flags else token_dtype(vocab_size)
        self.manifest = dict(format=FORMAT, version=VERSION, seq_len=seq_len, dtype=self.dtype.name,
                             vocab_size=vocab_size, eos_id=eos_id, tokenizer=tokenizer or {"file": "", "sha256": ""},
                             samples_per_member=samples_per_member, shard_samples=shard_samples,
                             member_checksum=MEMBER_CHECKSUM, documents=0, samples=0, tokens=0, dropped_tokens=0,
                             shards=[])
        if token_flags:
            self.manifest["token_flags"] = True
        self._tail = np.zeros(0, self.dtype)  # tokens not yet in a whole sample
        self._pending, self._npending = [], 0  # whole samples not yet in a shard
        self._member = 0

    def add(self, tokens: np.ndarray, documents: int = 0) -> None:
        """Append token ids (documents already joined with EOS)."""
        self.manifest["documents"] += documents
        t = np.concatenate([self._tail, tokens.astype(self.dtype, copy=False)])
        n = len(t) // self.sample_len
        self._tail = t[n * self.sample_len:]
        if n:
            self._pending.append(t[:n * self.sample_len].reshape(n, self.sample_len))
            self._npending += n
        while self._npending >= self.shard_samples:
            self._flush(self.shard_samples)

    def _flush(self, n: int) -> None:
        pending = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        samples, rest = pending[:n], pending[n:]
        self._pending, self._npending = ([rest] if len(rest) else []), len(rest)
        self._write_shard(samples)

    def _write_shard(self, samples: np.ndarray) -> None:
        from webdataset import TarWriter
        name = f"shard-{len(self.manifest['shards']):06d}.tar"
        path = os.path.join(self.output, name)
        members = 0
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            with TarWriter(f, user="", group="", mode=0o644, mtime=0, encoder=False) as w:
                for i in range(0, len(samples), self.spm):
                    data = npy_bytes(samples[i:i + self.spm])
                    w.write({"__key__": f"{self._member:09d}", "npy": data, "npy.xxh3": member_digest(data).encode()})
                    self._member += 1
                    members += 1
        m = self.manifest
        m["shards"].append(dict(name=name, samples=len(samples), members=members, tokens=samples.size,
                                max_token_id=int((unpack(samples)[0] if self.token_flags else samples).max()),
                                sha256=file_sha256(path)))
        m["samples"] += len(samples)
        m["tokens"] += samples.size

    def close(self) -> dict:
        """Write the last (partial) shard and the manifest; return the manifest."""
        if self._npending:
            self._flush(self._npending)
        self.manifest["dropped_tokens"] = len(self._tail)
        write_json(os.path.join(self.output, MANIFEST), self.manifest)
        return self.manifest


# ---------------------------------------------------------------------------------------------- tokenizing

def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _ordered_map(fn, items, workers: int, init, initargs):
    """fn over items in `workers` processes, results in input order, at most 2 x workers chunks in flight."""
    if workers == 1:
        init(*initargs)
        yield from map(fn, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers, init, initargs) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_shards(tokenizer: str, inputs, output: str, seq_len: int, text_key: str = "text",
                 samples_per_member: int = 64, shard_samples: int = 8192, workers: int = 0,
                 append_eos: bool = True) -> dict:
    """Tokenize `inputs` (files/globs: text, .jsonl, .parquet, .gz/.zst of text or jsonl; see inputs.py) into
    WebDataset shards in `output`; returns the manifest."""
    from tqdm import tqdm

    tok = load_tokenizer(tokenizer)
    files = expand_inputs(inputs)
    if append_eos and tok.eos_id is None:
        raise BigtrainError(f"tokenizer {tokenizer} has no EOS token to join documents with: pass --no-eos")
    writer = ShardWriter(output, seq_len, tok.vocab_size, samples_per_member, shard_samples, eos_id=tok.eos_id,
                         tokenizer=dict(file=os.path.basename(tokenizer), sha256=tok.sha256))
    workers = workers or _cores()
    init = (tokenizer, tok.eos_id if append_eos else None, writer.dtype.name, text_key)
    with tqdm(desc=f"tokenizing {len(files)} files", unit="doc", file=sys.stderr, mininterval=0.5) as bar:
        for ids, ndocs in _ordered_map(run_task, plan_tasks(files, text_key, tok, workers), workers, init_worker,
                                       init):
            writer.add(ids, ndocs)
            bar.update(ndocs)
            bar.set_postfix(shards=len(writer.manifest["shards"]), refresh=False)
    if not writer.manifest["shards"] and not writer._npending:
        raise BigtrainError(f"{output}: the inputs hold {len(writer._tail)} tokens, fewer than one sample of "
                            f"seq_len + 1 = {seq_len + 1}: no shard written")
    m = writer.close()
    print(f"wrote {len(m['shards'])} shards to {output}: {m['documents']} documents, {m['samples']} samples, "
          f"{m['tokens']} tokens ({m['dropped_tokens']} dropped in the trailing partial sample)", file=sys.stderr)
    return m
