"""`bigtrain data show DIR`: the first samples of a shard directory decoded, with the tokens not trained on and
the document starts marked (chat shards: their words' flags; plain shards: all trained, a document after each EOS).

Human view (legend on the first line): trained text plain, text not trained in `[[...]]`, `⟂` before each
document start, a span of one token repeated N >= 4 times (padding) as `T×N`. `--json`: one object per sample,
`{"sample": i, "spans": [{"text", "trained"[, "doc_start": true]}]}`, one span per run of tokens with the same mask,
a new span at each document start.
"""
from __future__ import annotations

import json
import os
import sys
import tarfile

import numpy as np

from ..errors import BigtrainError
from . import words
from .members import decode_npy
from .shards import MANIFEST
from .tokenizer import load_tokenizer

LEGEND = "legend: plain = trained, [[...]] = not trained (loss mask 0), ⟂ = a document starts, T×N = token T N times"


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise BigtrainError(f"{directory}: no {MANIFEST}: not a shard directory written by `bigtrain shards`") from None


def iter_rows(directory: str, manifest: dict):
    """The samples of the directory's shards in stored order (shard, member, row) as int64 words."""
    for sh in manifest["shards"]:
        with tarfile.open(os.path.join(directory, sh["name"])) as tar:
            for info in tar:
                if info.name.endswith(".npy"):
                    yield from decode_npy(tar.extractfile(info).read()).astype(np.int64)


def find_tokenizer(directory: str, manifest: dict, given: str | None):
    """--tokenizer, else the manifest's tokenizer file in DIR or beside it (its sha256 checked)."""
    info = manifest.get("tokenizer") or {}
    if given:
        tok = load_tokenizer(given)
        if info.get("sha256") and tok.sha256 != info["sha256"]:
            print(f"bigtrain: warning: {given} is not the tokenizer these shards were written with (sha256 "
                  f"{tok.sha256[:12]}, the manifest says {info['sha256'][:12]})", file=sys.stderr)
        return tok
    name, parent = info.get("file"), os.path.dirname(os.path.abspath(directory))
    for d in (directory, parent):
        path = os.path.join(d, name or "")
        if name and os.path.isfile(path):
            tok = load_tokenizer(path)
            if info.get("sha256") and tok.sha256 != info["sha256"]:
                raise BigtrainError(f"{path}: sha256 {tok.sha256[:12]} differs from the tokenizer {directory} was "
                                    f"written with ({info['sha256'][:12]}): pass that one as --tokenizer")
            return tok
    raise BigtrainError(f"{directory}: no tokenizer to decode with: pass --tokenizer (the manifest names "
                        f"{name or 'none'!r}, not found in {directory} or {parent})")


def sample_spans(row: np.ndarray, eos_id: int | None, flags: bool) -> list[tuple[np.ndarray, bool, bool]]:
    """(ids, trained, doc_start) runs of one sample: a new run where the mask changes or a document starts."""
    ids, trained, flagged, _ = words.unpack(row)
    starts = words.document_starts(ids, eos_id, flagged if flags else None)
    cuts = np.flatnonzero(starts | np.r_[True, trained[1:] != trained[:-1]])
    return [(ids[a:b], bool(trained[a]), bool(starts[a])) for a, b in zip(cuts, np.r_[cuts[1:], len(ids)])]


def show(directory: str, samples: int = 2, tokenizer: str | None = None, as_json: bool = False) -> str:
    manifest = read_manifest(directory)
    tok = find_tokenizer(directory, manifest, tokenizer)
    flags = bool(manifest.get("token_flags"))
    out = [] if as_json else [LEGEND]
    for i, row in enumerate(iter_rows(directory, manifest)):
        if i == samples:
            break
        spans = [(tok.decode(ids) if as_json or len(ids) < 4 or (ids != ids[0]).any()
                  else f"{tok.decode(ids[:1])}×{len(ids)}", trained, start)  # a run of padding, shortened
                 for ids, trained, start in sample_spans(row, manifest.get("eos_id"), flags)]
        if as_json:
            spans = [dict(text=t, trained=tr, **({"doc_start": True} if s else {})) for t, tr, s in spans]
            out.append(json.dumps({"sample": i, "spans": spans}, ensure_ascii=False))
        else:
            n_trained = int(words.unpack(row)[1].sum()) if flags else len(row)
            out.append(f"── sample {i}: {len(row)} tokens, {n_trained} trained")
            out.append("".join(("⟂" if s else "") + (t if tr else f"[[{t}]]") for t, tr, s in spans))
    return "\n".join(out)
