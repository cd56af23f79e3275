"""Config: one typed dataclass tree (schema.py) loaded from YAML plus `key=value` overrides (load.py)."""
from .load import ConfigError, describe, dump, load_config, to_dict
from .schema import (CheckpointConfig, Config, DataConfig, DataSource, LaunchConfig, ModelConfig, ParallelConfig,
                     RunConfig, TrainConfig, ValidationSet, ffn_size, kv_heads, padded_vocab)

__all__ = ["Config", "ConfigError", "load_config", "describe", "dump", "to_dict", "RunConfig", "ModelConfig",
           "TrainConfig", "ParallelConfig", "DataConfig", "DataSource", "ValidationSet", "CheckpointConfig",
           "LaunchConfig",
           "ffn_size", "kv_heads", "padded_vocab"]
