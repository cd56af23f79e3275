"""`bigtrain generate`'s decoding on several layouts of one checkpoint: greedy output (and a seeded sample) is the
same at TP1 (DP2), TP2 and PP2, with the KV cache and without it (also under sequence parallelism)."""
import pytest
from helpers import tiny

from bigtrain.config import load_config
from bigtrain.data import load_tokenizer
from bigtrain.eval.load import load_for_inference
from bigtrain.eval.decode import generate
from bigtrain.train import train

PROMPTS = ["import json\n", "def loads(s, *, cls=None", ""]


@pytest.mark.world(2)
def test_generation_is_the_same_on_every_layout(data, shared_dir):
    train(load_config(None, tiny(data, shared_dir, "train.steps=4")))
    outputs = {}
    for layout in ("parallel.tensor=1", "parallel.tensor=2", "parallel.pipeline=2"):
        loaded = load_for_inference(shared_dir, [layout])
        tok = load_tokenizer(loaded.tokenizer)
        for name, kw in (("greedy", {}), ("sampled", {"temperature": 1.0, "top_p": 0.9, "seed": 11})):
            results = generate(loaded.model, loaded.cfg, tok, PROMPTS, max_new_tokens=10, **kw)
            outputs[layout, name] = [(r["tokens"], r["completion"]) for r in results]
        if layout == "parallel.tensor=2":
            plain = generate(loaded.model, loaded.cfg, tok, PROMPTS, max_new_tokens=10, kv_cache=False)
            assert [(r["tokens"], r["completion"]) for r in plain] == outputs[layout, "greedy"]
    # the in-loop samples' path on a sequence-parallel model: the prefix re-encoded, right-padded to a multiple of TP
    loaded = load_for_inference(shared_dir, ["parallel.tensor=2", "parallel.sequence_parallel=true"])
    sp = generate(loaded.model, loaded.cfg, tok, PROMPTS, max_new_tokens=10, kv_cache=False)
    assert [(r["tokens"], r["completion"]) for r in sp] == outputs["parallel.tensor=1", "greedy"]
    for name in ("greedy", "sampled"):
        reference = outputs["parallel.tensor=1", name]
        assert all(len(tokens) == 10 for tokens, _ in reference)
        for layout in ("parallel.tensor=2", "parallel.pipeline=2"):
            assert outputs[layout, name] == reference, (layout, name)
