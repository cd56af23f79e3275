"""The Llama-style GPT, built from megatron-core blocks: RMSNorm, SwiGLU, RoPE, grouped-query attention,
tied or untied embeddings.

Everything here is model: it knows about tensor/sequence/pipeline parallelism only through megatron's
`parallel_state` (which stage it is, how its layers are split) and nothing of DeepSpeed, data or SLURM.

`build_model(cfg)` returns this rank's `GPTModel` (one pipeline stage) with a layout-independent
initialisation: every parameter is drawn as the full, unsharded tensor from a generator seeded by
(train.seed, the parameter's global name), then sliced to this rank. The same seed therefore gives the same
network on one process and on any TP x PP layout (see layout.py).
"""
from __future__ import annotations

import functools
import hashlib
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from ..config import Config, ffn_size, kv_heads, padded_vocab
from .layout import param_maps, shard_of


class RMSNorm(torch.nn.Module):
    """RMSNorm that also works under sequence parallelism: each tensor-parallel rank normalises its own
    slice of the sequence, so the weight's gradient is summed over the TP group inside autograd
    (independent of whatever optimizer engine reduces gradients afterwards)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.sequence_parallel = config.sequence_parallel
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        w = self.weight
        if self.sequence_parallel:
            w = tensor_parallel.copy_to_tensor_model_parallel_region(w)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


class SDPAttention(MegatronModule):
    """megatron core-attention interface on top of `torch.nn.functional.scaled_dot_product_attention`
    (flash / cuDNN / memory-efficient kernels on GPU): causal, grouped-query, never materialises the
    score matrix. Inputs are megatron's [seq, batch, heads, head_dim]; output [seq, batch, heads*head_dim].
    Queries shorter than the keys (decoding from a KV cache: the new positions after the cached ones) see every
    key up to their own position (the causal mask aligned bottom-right). An `attention_mask` [b, 1, s, s] (True =
    may not attend, megatron's convention; documents packed in one sample, data/targets.py) replaces the causal
    mask: on CPU through SDPA, on GPU through FlexAttention (compiled: fused, and blocks that no query of a
    document attends to are skipped), which `flex_attend` gives the same result as on CPU (tests)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None, **_):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences and attention biases are not supported")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [b, heads, s, d]
        dropout = self.dropout if self.training else 0.0
        if dropout > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._attend(q, k, v, dropout, attention_mask)
        else:
            out = self._attend(q, k, v, dropout, attention_mask)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _attend(self, q, k, v, dropout, blocked=None):
        sq, sk = q.shape[2], k.shape[2]
        if blocked is not None and q.is_cuda and dropout == 0:
            return flex_attend(q, k, v, blocked, self.softmax_scale, compiled=True)
        if blocked is not None:
            mask = ~blocked
        else:
            mask = None if sq == sk else torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                              scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])


class GPT(GPTModel):
    """megatron's GPTModel whose `position_ids` [b, s], when given, are the RoPE positions of the tokens (they
    restart at each document of a packed sample under data.document_masking); None: 0..s-1 as usual."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._positions = None
        rope = getattr(self, "rotary_pos_emb", None)
        if rope is not None:
            table = rope.forward  # [s, 1, 1, dim] for positions 0..s-1 (cached by megatron)

            def forward(max_seq_len, *a, **kw):
                emb = table(max_seq_len, *a, **kw)
                if self._positions is None:
                    return emb
                return emb[:, 0, 0][self._positions].transpose(0, 1)[:, :, None]  # [s, b, 1, dim]
            rope.forward = forward

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        self._positions = position_ids
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self._positions = None


def flex_attend(q, k, v, blocked, scale=None, compiled=False):
    """FlexAttention of q [b, heads, s, d] over k, v [b, kv heads, s, d] where `blocked` [b, 1, s, s] is False.
    `compiled`: torch.compile'd (GPU; eager FlexAttention is a slow reference and has no backward on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def allowed(b, h, qi, ki):
        return ~blocked[b, 0, qi, ki]

    block_mask = create_block_mask(allowed, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _defer_init(weight):
    """megatron's init hook: a no-op, `initialize` fills every parameter after the model is built."""


def transformer_config(cfg: Config) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    recompute = {"none": None, "selective": "selective", "full": "full"}[p.activation_checkpointing]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=kv_heads(m),
        ffn_hidden_size=ffn_size(m),
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_std,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        # no Apex / Transformer Engine: plain PyTorch paths only
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # parameters are allocated on the device; megatron only tags them with their TP partitioning
        # here, bigtrain initialises every one itself afterwards (see `initialize`)
        perform_initialization=True,
        use_cpu_initialization=False,
        init_method=_defer_init,
        output_layer_init_method=_defer_init,
        embedding_init_method=_defer_init,
        deallocate_pipeline_outputs=False,
    )


def layer_spec(cfg: Config):
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    if cfg.model.attention == "sdpa":
        sub.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_model(cfg: Config) -> GPT:
    """This rank's pipeline stage of the GPT, initialised (see module docstring). Needs megatron's
    parallel_state initialised for cfg.parallel."""
    tcfg = transformer_config(cfg)
    spec = layer_spec(cfg)
    n_local = get_num_layers_to_build(tcfg)
    block = TransformerBlockSubmodules(layer_specs=[spec] * n_local, layer_norm=RMSNorm)
    model = GPT(
        config=tcfg,
        transformer_layer_spec=block,
        vocab_size=padded_vocab(cfg.model),
        max_sequence_length=cfg.model.seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.model.rope_theta,
    )
    initialize(model, cfg)
    return model


# --- layout-independent initialisation -------------------------------------------------------------

def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@torch.no_grad()
def initialize(model: GPTModel, cfg: Config) -> None:
    """Draw every parameter as its full tensor from a generator seeded by (seed, global name), keep this
    rank's pieces: the same network for any TP x PP layout."""
    m = cfg.model
    out_std = m.init_std / math.sqrt(2 * m.num_layers) if m.scaled_init_output_layers else m.init_std
    for pm in param_maps(model, m.tie_embeddings):
        p, name = pm.param, pm.global_name
        if name.endswith("layernorm.weight"):
            p.fill_(1.0)
        elif p.ndim == 1:
            p.zero_()
        else:
            std = out_std if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else m.init_std
            gen = torch.Generator(device=p.device).manual_seed(_seed(cfg.train.seed, name))
            full = torch.empty(pm.full_shape, dtype=torch.float32, device=p.device).normal_(0.0, std, generator=gen)
            p.copy_(shard_of(full, pm))
