"""Where the shards come from, checked once at start-up (no shard is read here).

A source is a shard directory with manifest.json (written by `bigtrain shards`): a local one, or an http(s) / S3
URL ending in '/' (`https://host/dir/`, `s3://bucket/prefix/`) with manifest.json under it. Or a brace-expanded
list of shard paths / URLs / `pipe:` commands; an http(s) or S3 list uses the manifest.json beside its shards when
there is one. Shards are read by remote.py. Without a manifest each URL is one shard of unknown size: nothing is
checked before it is read, and a shard lost mid-read counts as one skipped member (data.max_skip_fraction then
undercounts). `check_data(cfg)` opens every source of the config, loads the tokenizer once, checks the manifests
against the model (sequence length, vocabulary, tokenizer identity, token ids) and fixes the lane count: the
`DataPlan` the loaders are built from.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import braceexpand

from ..errors import BigtrainError
from . import remote
from .remote import ReadOptions
from .shards import FORMAT, MANIFEST

log = logging.getLogger("bigtrain.data")
MAX_AUTO_LANES = 64


@dataclass
class Source:
    name: str
    path: str
    weight: float
    urls: list[str]
    manifest: dict | None = None  # None for URL lists without one and pipe: commands
    members: list = field(default_factory=list)  # members per shard (None where unknown)
    base: str = ""  # the directory (local or URL) of the manifest
    reading: ReadOptions = field(default_factory=ReadOptions)  # timeouts and retries of remote reads


def open_source(path: str, name: str = "", weight: float = 1.0, reading: ReadOptions | None = None) -> Source:
    """A shard directory (local, or an http(s)/S3 URL ending in '/') or a brace-expanded list of shard paths,
    URLs or `pipe:` commands."""
    name = name or os.path.basename(path.rstrip("/")) or path
    reading = reading or ReadOptions()
    if remote.is_dir_url(path) or os.path.isdir(path):
        remote.check_url(path)
        mpath = remote.join(path, MANIFEST)
        if remote.scheme(path):
            data = remote.fetch(mpath, reading)
        else:
            try:
                with open(mpath, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                data = None
            except OSError as e:
                raise BigtrainError(f"{mpath}: unreadable ({e})") from None
        if data is None:
            raise BigtrainError(f"data source {path}: no {MANIFEST} (not a `bigtrain shards` output directory)")
        m = parse_manifest(data, mpath)
        return Source(name, path, weight, [remote.join(path, s["name"]) for s in m["shards"]], m,
                      [s["members"] for s in m["shards"]], path, reading)
    urls = list(braceexpand.braceexpand(path))
    for u in urls:
        if remote.scheme(u):
            remote.check_url(u)
        elif not os.path.exists(u):
            raise BigtrainError(f"data source {path}: {u} does not exist")
    return with_remote_manifest(Source(name, path, weight, urls, None, [None] * len(urls), "", reading))


def parse_manifest(data: bytes, mpath: str) -> dict:
    try:
        m = json.loads(data)
    except ValueError as e:
        raise BigtrainError(f"{mpath}: unreadable ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BigtrainError(f"{mpath}: not a bigtrain shard manifest (format {m.get('format') if isinstance(m, dict) else m!r})")
    missing = [k for k in ("seq_len", "vocab_size", "tokenizer", "shards") if k not in m]
    if missing:
        raise BigtrainError(f"{mpath}: manifest lacks {', '.join(missing)}")
    if not m["shards"]:
        raise BigtrainError(f"{mpath}: lists no shards")
    return m


def with_remote_manifest(src: Source) -> Source:
    """An http(s) or S3 URL list whose shards share one directory: the manifest.json there, when there is one and
    it lists every shard, gives their member counts (a lost shard counts what it really lost) and the start-up
    checks, restricted to the listed shards."""
    bases = {u.rsplit("/", 1)[0] for u in src.urls}
    if len(bases) != 1 or remote.scheme(next(iter(bases))) not in remote.REMOTE:
        return src
    base = bases.pop()
    mpath = remote.join(base, MANIFEST)
    data = remote.fetch(mpath, src.reading)
    if data is None:
        log.info("data source %s: no %s beside its shards: a shard lost mid-read counts as one skipped member",
                 src.path, mpath)
        return src
    m = parse_manifest(data, mpath)
    listed = {s["name"]: s for s in m["shards"]}
    names = [u.rsplit("/", 1)[1] for u in src.urls]
    if not all(n in listed for n in names):
        log.warning("data source %s: %s does not list %s: not used", src.path, mpath,
                    next(n for n in names if n not in listed))
        return src
    shards = [listed[n] for n in names]
    src.manifest = {**m, "shards": shards, "samples": sum(s["samples"] for s in shards),
                    "tokens": sum(s["tokens"] for s in shards)}
    src.members, src.base = [s["members"] for s in shards], base
    return src


@dataclass
class DataPlan:
    """The checked data of a config: training sources, the validation sets, the lane count, the tokenizer."""
    sources: list[Source]
    validation: list[Source]    # the held-out sets, in config order (named as data.validation names them)
    lanes: int
    tokenizer: object | None


def check_data(cfg) -> DataPlan:
    """Every start-up check of the data config (sources, validation, tokenizer), reading no shard."""
    from .tokenizer import load_tokenizer
    if not cfg.data.sources:
        raise BigtrainError("data.sources is empty: give at least one shard directory or URL list")
    reading = ReadOptions.of(cfg.data)
    sources = [open_source(s.path, s.name, s.weight, reading) for s in cfg.data.sources]
    validation = [open_source(path, name, reading=reading) for name, path in cfg.data.validation_sets()]
    tokenizer = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    check_sources(sources + validation, cfg, tokenizer)
    return DataPlan(sources, validation, num_lanes(cfg, sources), tokenizer)


def check_sources(sources: list[Source], cfg, tokenizer=None) -> None:
    """Manifests against the config: seq_len, the tokenizer (vocab size and sha256), token ids."""
    V = cfg.model.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > V:
        raise BigtrainError(f"data.tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than "
                            f"model.vocab_size={V}")
    for s in sources:
        m = s.manifest
        if m is None:
            continue
        mpath = remote.join(s.base, MANIFEST)
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
                raise BigtrainError(f"{remote.join(s.base, sh['name'])}: holds token id {sh['max_token_id']} >= "
                                    f"model.vocab_size={V}")


def num_lanes(cfg, sources: list[Source]) -> int:
    K = cfg.data.lanes or max(1, min(MAX_AUTO_LANES, min(len(s.urls) for s in sources)))
    for s in sources:
        if len(s.urls) < K:
            raise BigtrainError(f"data source '{s.name}' ({s.path}) has {len(s.urls)} shards, fewer than the "
                                f"{K} lanes of data.lanes={cfg.data.lanes}: set data.lanes <= {len(s.urls)} (or 0) "
                                f"or write more shards (bigtrain shards --shard-samples)")
    return K
