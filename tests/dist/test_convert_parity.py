"""A checkpoint trained at TP2 x PP2 exports to a Hugging Face model whose transformers logits equal
bigtrain's own forward -- run in the same TP2 x PP2 layout -- within 1e-4 (fp32)."""
import os

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from bigtrain.checkpoint import load_weights
from bigtrain.config import load_config
from bigtrain.convert import to_hf
from bigtrain.model import build_model
from bigtrain.parallel import init_model_parallel
from bigtrain.parallel.schedule import logits
from bigtrain.train import train
from helpers import tiny


@pytest.mark.world(4)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tp2_pp2_export_matches_transformers(tied, data, shared_dir):
    cfg = load_config(None, tiny(data, shared_dir, "parallel.tensor=2", "parallel.pipeline=2", "train.steps=3",
                                 f"model.tie_embeddings={str(tied).lower()}"))
    train(cfg)
    init_model_parallel(2, 2, cfg.train.seed)
    model = build_model(cfg)
    load_weights(model, shared_dir, tied)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(7))
    ours = logits(model, tokens, cfg)
    # bring the last stage's logits to rank 0 (one contributor, zeros elsewhere)
    box = torch.zeros(2, 32, cfg.model.vocab_size)
    if ours is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        box += ours[..., : cfg.model.vocab_size]
    dist.all_reduce(box)
    if dist.get_rank() == 0:
        out = os.path.join(shared_dir, "hf")
        to_hf(shared_dir, out)
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            theirs = hf(tokens).logits
        diff = (theirs - box).abs().max().item()
        assert diff <= 1e-4, diff
        assert box.abs().max() > 0.1  # real logits arrived
    dist.barrier()
