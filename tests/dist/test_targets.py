"""What the trainer trains on (data/targets.py): loss masks, document masking, the step's loss normalisation and
per-source loss weights, on real megatron models in several layouts (torchrun, gloo)."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import masked_shards, max_rel_diff, tiny

from bigtrain.config import load_config
from bigtrain.data.words import pack, with_source
from bigtrain.eval.load import load_for_inference
from bigtrain.parallel.schedule import forward_backward, logits
from bigtrain.train import train
from bigtrain.data.targets import document_mask, document_positions


def _ids(n, seed):
    return torch.from_numpy(np.random.default_rng(seed).integers(3, 500, n)).long()


@pytest.mark.world(2)
def test_a_document_packed_after_another_has_the_logits_it_has_alone(data, shared_dir):
    """Document masking: B's logits packed after A equal B's alone, at TP1 and TP2 (1e-5); without the mask they
    differ (the test can fail)."""
    train(load_config(None, tiny(data, shared_dir, "train.steps=2")))
    a, b = _ids(11, 1), _ids(21, 2)
    packed = torch.cat([a, b])[None]                                  # [1, 32]
    starts = torch.zeros(1, 32, dtype=torch.bool)
    starts[0, 0] = starts[0, 11] = True
    seg, pos = document_positions(starts)
    assert pos[0, 11:].tolist() == list(range(21)) and pos[0, :11].tolist() == list(range(11))
    for layout in ("parallel.tensor=1", "parallel.tensor=2"):
        loaded = load_for_inference(shared_dir, [layout, "data.document_masking=true"])
        together = logits(loaded.model, packed, loaded.cfg, position_ids=pos, attention_mask=document_mask(seg))
        alone = logits(loaded.model, b[None], loaded.cfg)
        plain = logits(loaded.model, packed, loaded.cfg)
        assert torch.allclose(together[0, 11:], alone[0], rtol=1e-5, atol=1e-5), layout
        assert (together[0, :11] - logits(loaded.model, a[None], loaded.cfg)[0]).abs().max() < 1e-5
        assert (plain[0, 11:] - alone[0]).abs().max() > 1e-3  # without document masking B sees A


@pytest.mark.world(2)
def test_packed_loss_is_the_token_weighted_mean_of_the_documents_alone(data, shared_dir):
    train(load_config(None, tiny(data, shared_dir, "train.steps=2")))
    loaded = load_for_inference(shared_dir, ["parallel.tensor=2", "data.document_masking=true"])
    a, b = _ids(12, 3), _ids(21, 4)                                  # 33 = seq_len + 1 words in all
    doc = np.zeros(33, bool)
    doc[[0, 12]] = True
    packed = torch.from_numpy(pack(torch.cat([a, b]).numpy(), None, doc).astype(np.int64))[None]

    def alone(x):  # the document, then not-trained padding that starts a document of its own
        pad = 33 - len(x)
        words = pack(np.concatenate([x.numpy(), np.zeros(pad, np.int64)]), np.arange(33) < len(x),
                     np.isin(np.arange(33), [0, len(x)]))
        return torch.from_numpy(words.astype(np.int64))[None]

    def loss(words):
        return forward_backward(None, words.repeat(2, 1), loaded.cfg, forward_only=True, model=loaded.model)

    la, lb = loss(alone(a)), loss(alone(b))
    want = (la * 11 + lb * 20) / 31  # A predicts 11 tokens, B 20 (a document's first token is not a target)
    got = loss(packed)
    assert abs(got - want) / want < 1e-5, (got, want, la, lb)


@pytest.mark.world(2)
@pytest.mark.parametrize("layout", [("parallel.tensor=1",), ("parallel.pipeline=2",), ("train.micro_batch_size=1",),
                                    ("train.micro_batch_size=4",)], ids=["dp2", "pp2", "mb1", "mb4"])
def test_masked_losses_are_the_same_on_any_split(data, shared_dir, reference, layout):
    """Loss masks that train uneven shares of each sample: the loss is sum / global count of trained tokens,
    so DP2 (mb2), PP2, 8 and 2 microbatches (DP2) give one process's per-step losses (1e-5). (With a per-microbatch
    mean, uneven masks would weigh the microbatches' tokens differently.)"""
    path = masked_shards(data)
    overrides = tiny(data, shared_dir, f"data.sources=[{{path: {path}}}]", "train.steps=4")
    want = reference(overrides)
    got = [r["loss"] for r in train(load_config(None, overrides + list(layout))).history]
    assert max_rel_diff(got, want) < 1e-5, (got, want)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()


@pytest.mark.world(2)
def test_weight_zero_on_a_source_gives_the_gradients_of_a_batch_without_it(data, shared_dir):
    train(load_config(None, tiny(data, shared_dir, "train.steps=2")))
    two = f"data.sources=[{{path: {data['train']}}}, {{path: {data['train_b']}, loss_weight: 0}}]"
    loaded = load_for_inference(shared_dir, ["parallel.tensor=2", two])
    model, cfg = loaded.model, loaded.cfg
    model.train()
    rows = torch.stack([_ids(33, s) for s in range(4)])
    with_b = torch.from_numpy(with_source(rows.numpy(), np.array([0, 1, 0, 1])))  # rows 1 and 3 from source B

    def grads(words, c):
        model.zero_grad(set_to_none=True)
        forward_backward(None, words, c, model=model)
        return _grads(model)

    g_weighted = grads(with_b, cfg)
    g_without = grads(rows[[0, 2]], cfg)
    assert torch.allclose(g_weighted, g_without, rtol=1e-5, atol=1e-7)
    one = load_config(None, tiny(data, shared_dir, "parallel.tensor=2",
                                 two.replace("loss_weight: 0", "loss_weight: 1")))
    assert (grads(with_b, one) - g_without).abs().max() > 1e-4  # weight 1: B's tokens count (the test can fail)


@pytest.mark.world(2)
def test_per_source_losses_and_token_counts_are_logged_and_survive_a_resume(data, shared_dir):
    two = (f"data.sources=[{{path: {data['train']}, name: a}}, {{path: {masked_shards(data, 'train_b')}, name: b, "
           "loss_weight: 0.5}]")
    base = tiny(data, shared_dir, two, "train.steps=4", "checkpoint.interval=2")
    first = train(load_config(None, base + ["train.steps=2"])).history
    rest = train(load_config(None, base)).history
    whole = train(load_config(None, tiny(data, shared_dir + "-whole", two, "train.steps=4"))).history
    rows = list(first) + list(rest)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r, w in zip(rows, whole):
        assert r["loss"] == w["loss"] and r["train/tokens/a"] == w["train/tokens/a"]
        assert r["train/loss/b"] == w["train/loss/b"] and r["train/tokens/b"] == w["train/tokens/b"]
    tokens = [(r["train/tokens/a"], r["train/tokens/b"]) for r in whole]
    assert all(x[0] <= y[0] and x[1] <= y[1] for x, y in zip(tokens, tokens[1:])), tokens  # a step may lack one
    assert tokens[0][0] < tokens[-1][0] and tokens[0][1] < tokens[-1][1], tokens
    # a of plain shards: every label trained; b masked: fewer; together all 8 x 32 labels of each step
    assert tokens[0][0] % 32 == 0 and tokens[0][1] < 8 * 32 - tokens[0][0]
    # the step's loss is the weighted mean of the two sources' means
    r = next(r for r in whole if r["train/loss/b"] is not None)
    assert r["train/loss/a"] is not None
    na, nb = r["train/tokens/a"], r["train/tokens/b"]
    if r["step"] > 1:
        before = whole[r["step"] - 2]
        na, nb = na - before["train/tokens/a"], nb - before["train/tokens/b"]
    want = (r["train/loss/a"] * na + 0.5 * r["train/loss/b"] * nb) / (na + 0.5 * nb)
    assert abs(r["loss"] - want) / want < 1e-6
