"""The one name map between bigtrain's megatron-core GPT and Hugging Face Llama, read in both directions.

Each `Rule` is one bigtrain tensor, the HF tensors it corresponds to, and how one becomes the other:

    embedding.word_embeddings.weight                    model.embed_tokens.weight            vocabulary padding
    decoder.layers.{i}.input_layernorm.weight           model.layers.{i}.input_layernorm.weight
    decoder.layers.{i}.self_attention.linear_qkv.weight model.layers.{i}.self_attn.{q,k,v}_proj.weight
                                                        (megatron interleaves per KV group: [q heads of group g; k_g; v_g])
    decoder.layers.{i}.self_attention.linear_proj.weight model.layers.{i}.self_attn.o_proj.weight
    decoder.layers.{i}.pre_mlp_layernorm.weight         model.layers.{i}.post_attention_layernorm.weight
    decoder.layers.{i}.mlp.linear_fc1.weight            model.layers.{i}.mlp.{gate,up}_proj.weight  ([gate; up])
    decoder.layers.{i}.mlp.linear_fc2.weight            model.layers.{i}.mlp.down_proj.weight
    decoder.final_layernorm.weight                      model.norm.weight
    output_layer.weight (untied only)                   lm_head.weight                       vocabulary padding

RoPE needs no permutation: megatron's non-interleaved rotary embedding is HF's rotate_half. bigtrain pads the
vocabulary (model.vocab_pad_multiple): the padded rows are dropped on export and zero-filled on import.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig, kv_heads, padded_vocab


def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hd = kv_heads(m), m.hidden_size // m.num_attention_heads
    per = m.num_attention_heads // groups
    w = qkv.view(groups, per + 2, hd, -1)
    return (w[:, :per].reshape(groups * per * hd, -1), w[:, per].reshape(groups * hd, -1),
            w[:, per + 1].reshape(groups * hd, -1))


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    groups, hd = kv_heads(m), m.hidden_size // m.num_attention_heads
    per = m.num_attention_heads // groups
    h = q.shape[-1]
    return torch.cat([q.view(groups, per, hd, h), k.view(groups, 1, hd, h), v.view(groups, 1, hd, h)], 1).reshape(-1, h)


class Same:
    """One tensor, as it is."""

    @staticmethod
    def to_hf(t, m):
        return (t,)

    @staticmethod
    def from_hf(ts, m):
        return ts[0]


class Vocab:
    """The embedding or LM head: bigtrain's rows are padded to a multiple of model.vocab_pad_multiple."""

    @staticmethod
    def to_hf(t, m):
        return (t[: m.vocab_size],)

    @staticmethod
    def from_hf(ts, m):
        (t,) = ts
        rows = padded_vocab(m)
        return torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])]) if rows > t.shape[0] else t


class QKV:
    @staticmethod
    def to_hf(t, m):
        return tuple(x.clone() for x in split_qkv(t, m))

    @staticmethod
    def from_hf(ts, m):
        return merge_qkv(*ts, m)


class GateUp:
    @staticmethod
    def to_hf(t, m):
        return tuple(x.clone() for x in t.chunk(2))

    @staticmethod
    def from_hf(ts, m):
        return torch.cat(ts)


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    how: type = Same


def rules(m: ModelConfig) -> list[Rule]:
    """Every tensor of the model, in order."""
    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Vocab)]
    for i in range(m.num_layers):
        b, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out += [Rule(b + "input_layernorm.weight", (h + "input_layernorm.weight",)),
                Rule(b + "self_attention.linear_qkv.weight", tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"),
                     QKV),
                Rule(b + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",)),
                Rule(b + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)),
                Rule(b + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), GateUp),
                Rule(b + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",))]
    out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not m.tie_embeddings:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), Vocab))
    return out
