"""Token words: what a sample holds for each position besides its token id. This module owns the layout; shards,
the loader and the trainer only call `pack` / `unpack`.

A sample is a row of seq_len + 1 unsigned integers ("words"):

    bits  0-29  the token id (vocabularies up to 2**30)
    bit   30    DOC_START: this token begins a document (a conversation, a packed text)
    bit   31    NOT_TRAINED: this token is not a training target (its loss weight is 0)
    bits 32-47  the sample's source index in data.sources (set by the loader on int64 rows, never stored)

Plain pretraining shards hold bare ids (flags 0: every token trained; documents are delimited by EOS, see
`document_starts`). Chat shards (`bigtrain shards --format chat`) store uint32 words with both flags and say so
in their manifest (`"token_flags": true`).
"""
from __future__ import annotations

import numpy as np

ID_BITS = 30
ID_MASK = (1 << ID_BITS) - 1
DOC_START = 1 << 30
NOT_TRAINED = 1 << 31
SOURCE_SHIFT = 32
SOURCE_MASK = 0xFFFF


def pack(ids, trained=None, doc_start=None) -> np.ndarray:
    """uint32 words from ids and per-token booleans (None: all trained / no document starts)."""
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) > ID_MASK:
        raise ValueError(f"token id {int(ids.max())} does not fit in {ID_BITS} bits")
    w = ids.astype(np.uint32)
    if trained is not None:
        w |= np.where(np.asarray(trained, bool), 0, NOT_TRAINED).astype(np.uint32)
    if doc_start is not None:
        w |= np.where(np.asarray(doc_start, bool), DOC_START, 0).astype(np.uint32)
    return w


def unpack(words):
    """(ids, trained, doc_start, source) of words: numpy arrays or torch tensors of any integer dtype."""
    if isinstance(words, np.ndarray):
        words = words.astype(np.int64, copy=False)
    ids = words & ID_MASK
    trained = (words & NOT_TRAINED) == 0
    doc_start = (words & DOC_START) != 0
    source = (words >> SOURCE_SHIFT) & SOURCE_MASK
    return ids, trained, doc_start, source


def with_source(rows: np.ndarray, source: np.ndarray) -> np.ndarray:
    """int64 rows tagged with each row's source index (bits 32-47)."""
    return rows.astype(np.int64, copy=False) | (np.asarray(source, np.int64)[:, None] << SOURCE_SHIFT)


def document_starts(ids, eos_id, flagged=None):
    """Where documents begin in rows [..., T] (numpy or torch alike). A row that carries DOC_START flags (`flagged`,
    chat shards, whose EOS may end every turn) begins them exactly there; a row without (plain shards) at the token
    after each EOS (its first token is not marked: where that document began is not in the row)."""
    starts = ids != ids  # all False
    if eos_id is not None:
        starts[..., 1:] = ids[..., :-1] == eos_id
    if flagged is None:
        return starts
    marked = flagged.any(-1)[..., None]
    return (flagged & marked) | (starts & ~marked)
