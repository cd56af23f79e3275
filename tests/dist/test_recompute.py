"""Activation recompute: megatron's full recompute, and the same routed through DeepSpeed's activation checkpointing
with the layer inputs partitioned across the tensor-parallel ranks and kept in host memory; per-step fp32 losses
equal the run without recompute (torchrun, gloo)."""
import pytest
from helpers import max_rel_diff, tiny

from bigtrain.config import load_config
from bigtrain.train import train


@pytest.mark.world(2)
def test_deepspeed_activation_checkpointing_partitioned_and_offloaded_matches_no_recompute(data, shared_dir):
    import deepspeed.runtime.activation_checkpointing.checkpointing as ds
    from megatron.core.transformer import transformer_block

    def losses(name, *extra):
        cfg = load_config(None, tiny(data, f"{shared_dir}/{name}", "parallel.tensor=2", "train.steps=3", *extra))
        return [r["loss"] for r in train(cfg).history]

    plain = losses("none")
    assert max_rel_diff(losses("megatron", "parallel.activation_checkpointing=full"), plain) < 1e-5
    full = ("parallel.activation_checkpointing=full", "parallel.partition_activations=true")
    assert max_rel_diff(losses("partitioned", *full), plain) < 1e-5
    assert ds.PARTITION_ACTIVATIONS and not ds.CPU_CHECKPOINT
    assert transformer_block.tensor_parallel.checkpoint.__module__ == "bigtrain.parallel.deepspeed_fence"
    assert max_rel_diff(losses("offloaded", *full, "parallel.offload_activations=true"), plain) < 1e-5
    assert ds.PARTITION_ACTIVATIONS and ds.CPU_CHECKPOINT
    losses("megatron-again", "parallel.activation_checkpointing=full")  # a later run in the process: megatron's own
    assert transformer_block.tensor_parallel.checkpoint.__module__.startswith("megatron.")
