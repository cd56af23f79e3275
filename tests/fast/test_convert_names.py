"""The HF name map: every rule's two directions are inverses, and the rules cover a transformers Llama exactly."""
import torch

from bigtrain.config import ModelConfig, padded_vocab
from bigtrain.convert.names import merge_qkv, rules, split_qkv


def test_qkv_split_inverts_merge_for_grouped_query_attention():
    for heads, kv in ((8, 8), (8, 2), (6, 1)):
        m = ModelConfig(hidden_size=48, num_attention_heads=heads, num_kv_heads=kv)
        hd = 48 // heads
        q, k, v = torch.randn(heads * hd, 48), torch.randn(kv * hd, 48), torch.randn(kv * hd, 48)
        qkv = merge_qkv(q, k, v, m)
        assert qkv.shape == ((heads + 2 * kv) * hd, 48)
        assert all(torch.equal(a, b) for a, b in zip(split_qkv(qkv, m), (q, k, v)))
        # megatron's interleave: group 0's query heads, then its key, then its value
        per = heads // kv
        assert torch.equal(qkv[:per * hd], q[:per * hd]) and torch.equal(qkv[per * hd:(per + 1) * hd], k[:hd])


def test_rules_cover_a_transformers_llama_and_round_trip():
    from transformers import LlamaConfig, LlamaForCausalLM
    for tied in (False, True):
        m = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                        ffn_hidden_size=64, tie_embeddings=tied)
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
        state = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
        table = rules(m)
        assert sorted(n for r in table for n in r.theirs) == sorted(state)
        for r in table:
            ours = r.how.from_hf([state[n] for n in r.theirs], m)
            if "embed" in r.theirs[0] or "lm_head" in r.theirs[0]:
                assert ours.shape[0] == padded_vocab(m) and not ours[300:].any()
            back = r.how.to_hf(ours, m)
            assert all(torch.equal(a, state[n]) for a, n in zip(back, r.theirs)), r.ours
