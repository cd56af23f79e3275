"""Where the shards come from, checked once at start-up (no shard is read here).

A source is a directory with manifest.json (written by `bigtrain shards`) or a brace-expanded list of URLs /
`pipe:` commands read with webdataset's gopen. Without a manifest each URL is one shard of unknown size.
`check_data(cfg)` opens every source of the config, loads the tokenizer once, checks the manifests against the
model (sequence length, vocabulary, tokenizer identity, token ids) and fixes the lane count: the `DataPlan`
the loaders are built from.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import braceexpand

from ..errors import BigtrainError
from .shards import FORMAT, MANIFEST

MAX_AUTO_LANES = 64


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
    sources = [open_source(s.path, s.name, s.weight) for s in cfg.data.sources]
    validation = [open_source(path, name) for name, path in cfg.data.validation_sets()]
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


def num_lanes(cfg, sources: list[Source]) -> int:
    K = cfg.data.lanes or max(1, min(MAX_AUTO_LANES, min(len(s.urls) for s in sources)))
    for s in sources:
        if len(s.urls) < K:
            raise BigtrainError(f"data source '{s.name}' ({s.path}) has {len(s.urls)} shards, fewer than the "
                                f"{K} lanes of data.lanes={cfg.data.lanes}: set data.lanes <= {len(s.urls)} (or 0) "
                                f"or write more shards (bigtrain shards --shard-samples)")
    return K
