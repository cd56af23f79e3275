"""Data: tokenizers, WebDataset token shards and the streaming loader.

    check_data(cfg) -> DataPlan                                    start-up checks (sources.py), reads no shard
    build_train_source(cfg, dp_rank, dp_size, plan) -> TokenStream  this rank's training stream (stream.py)
    build_validation_sources(cfg, dp_rank, dp_size, plan)           held-out sets by name (validation.py)
    load_tokenizer(path) -> Tokenizer                              sentencepiece .model or HF tokenizer.json
    merge_states([rank.local_state(), ...]) -> global loader state

The loader, one concern a module: sources.py (what is read), remote.py (a shard's bytes: local files, http(s),
S3, pipe: commands; timeouts and retries), members.py (reading one source's shards: tar members, checksums,
skips), order.py (the global sample order: lanes and blending), workers.py (background reader processes),
stream.py (the stream and its state), validation.py. Imports are lazy so that tokenizer processes and
`bigtrain tokenizer` start without torch.
"""
import importlib

_EXPORTS = {
    "check_data": "sources", "DataPlan": "sources", "open_source": "sources",
    "build_train_source": "stream", "merge_states": "stream", "TokenStream": "stream",
    "build_validation_source": "validation", "build_validation_sources": "validation",
    "ValidationSource": "validation",
    "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer", "Tokenizer": "tokenizer",
    "write_shards": "shards", "ShardWriter": "shards",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
