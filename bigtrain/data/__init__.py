"""Data: tokenizers, WebDataset token shards and the streaming loader (see loader.py for the sample order).

    build_train_source(cfg, dp_rank, dp_size) -> BatchSource      (bigtrain.data.interface)
    build_validation_source(cfg, dp_rank, dp_size) -> object with batches(n), or None
    check_manifest(cfg)                                            start-up checks, reads no shard
    load_tokenizer(path) -> Tokenizer                              sentencepiece .model or HF tokenizer.json
    merge_states([rank.local_state(), ...]) -> global loader state

Imports are lazy so that tokenizer processes and `bigtrain tokenizer` start without torch.
"""
import importlib

_EXPORTS = {
    "build_train_source": "loader", "build_validation_source": "loader", "check_manifest": "loader",
    "merge_states": "loader", "TokenStream": "loader", "ValidationSource": "loader",
    "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer", "Tokenizer": "tokenizer",
    "write_shards": "shards", "ShardWriter": "shards",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
