"""Decoding from this rank's stage of the GPT, in any TP x PP (x DP) layout: the forward pass for the next token
(optionally from megatron-core's KV cache), the choice of the token (greedy, or temperature + top-p), and its
broadcast so that every rank continues with the same one. `bigtrain generate` (generate.py, whose docstring
explains the method and its cost) and the in-loop samples (bigtrain/train/samples.py) use it.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist


log = logging.getLogger("bigtrain")


# --- choosing a token ----------------------------------------------------------------------------------------

def pick(logits: torch.Tensor, vocab: int, temperature: float = 0.0, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> int:
    """The next token from one position's logits: argmax at temperature 0, else a draw from the softmax at
    `temperature` restricted to the smallest set of most likely tokens whose probability reaches `top_p`. Only ids
    below `vocab` are candidates."""
    x = logits[:vocab].detach().to("cpu", torch.float64)
    if temperature <= 0:
        return int(x.argmax())
    probs = torch.softmax(x / temperature, dim=-1)
    if top_p < 1.0:
        p, order = probs.sort(descending=True)
        keep = (p.cumsum(0) - p) < top_p  # the mass before a token is below top_p: the first always stays
        p = torch.where(keep, p, torch.zeros_like(p))
        return int(order[torch.multinomial(p / p.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


# --- the forward pass ----------------------------------------------------------------------------------------

def last_logits(model: torch.nn.Module, tokens: torch.Tensor, position: int, context=None) -> torch.Tensor | None:
    """Full-vocabulary logits [batch, padded vocab] (fp32) at `position` of token ids [batch, seq] through a bare
    model of any TP x PP layout (eval mode, no grad): on the last pipeline stage's ranks, None on the others. With a
    megatron `context` (StaticInferenceContext) the tokens are the positions after those it caches, and only the
    last position's logits exist (position -1)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from ..parallel.schedule import forward_only
    if context is not None:  # megatron gathers over TP itself in inference mode
        return forward_only(model, tokens, lambda out: out[:, position].contiguous().float(),
                            inference_context=context, runtime_gather_output=True)
    return forward_only(model, tokens,
                        lambda out: gather_from_tensor_model_parallel_region(out[:, position].contiguous()).float())


def source_rank(device) -> int:
    """The global rank that decides each token: last pipeline stage, TP rank 0, DP rank 0."""
    from megatron.core import parallel_state as ps
    me = dist.get_rank() if (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                             and ps.get_data_parallel_rank() == 0) else -1
    t = torch.tensor([me], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def generate_ids(model: torch.nn.Module, prompt: list[int], *, max_new_tokens: int, vocab: int, seq_length: int,
                 eos_id: int | None = None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 kv_cache: bool = True, src: int | None = None) -> list[int]:
    """Every rank, same arguments: the new token ids after `prompt` (EOS not included). The model must be in
    eval mode."""
    from megatron.core.inference.contexts import StaticInferenceContext
    device = next(model.parameters()).device
    src = source_rank(device) if src is None else src
    ids = list(prompt)[-(seq_length - 1):] or [0]
    budget = max(0, min(max_new_tokens, seq_length - len(ids)))
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    tp = model.config.tensor_model_parallel_size if model.config.sequence_parallel else 1
    context = StaticInferenceContext(1, len(ids) + budget) if kv_cache and budget else None
    new: list[int] = []
    pending = ids
    for _ in range(budget):
        if context is not None:
            logits = last_logits(model, torch.tensor([pending], device=device), -1, context)
            context.sequence_len_offset += len(pending)
        else:
            seq = ids + new
            padded = seq + [0] * (-len(seq) % tp)  # sequence parallelism splits positions over TP ranks
            logits = last_logits(model, torch.tensor([padded], device=device), len(seq) - 1)
        choice = torch.zeros(1, dtype=torch.long, device=device)
        if dist.get_rank() == src:
            choice[0] = pick(logits[0], vocab, temperature, top_p, generator)
        dist.broadcast(choice, src)
        token = int(choice.item())
        if token == eos_id:
            break
        new.append(token)
        pending = [token]
    return new


def completion_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The completion as text: what decoding prompt + completion adds to the decoded prompt (a sentencepiece
    decode of the new ids alone would drop a leading space), else the new ids decoded alone."""
    head = tokenizer.decode(prompt_ids)
    whole = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(new_ids)


def generate(model, cfg, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, kv_cache: bool = True, each=None) -> list[dict]:
    """Every rank: {"prompt", "completion", "tokens"} for each prompt (the same on every rank); `each(result)`
    is called as each one is done."""
    device = next(model.parameters()).device
    src = source_rank(device)
    vocab = min(tokenizer.vocab_size, cfg.model.vocab_size)
    results = []
    for text in prompts:
        prompt_ids = tokenizer.encode(text) if text else []
        if not prompt_ids:  # nothing to condition on: start a document
            prompt_ids = [t for t in (tokenizer.bos_id, tokenizer.eos_id) if t is not None][:1] or [0]
        if len(prompt_ids) >= cfg.model.seq_length:
            log.warning(f"generate: a prompt of {len(prompt_ids)} tokens keeps its last {cfg.model.seq_length - 1} "
                        f"(model.seq_length={cfg.model.seq_length})")
            prompt_ids = prompt_ids[-(cfg.model.seq_length - 1):]
        new = generate_ids(model, prompt_ids, max_new_tokens=max_new_tokens, vocab=vocab,
                           seq_length=cfg.model.seq_length, eos_id=tokenizer.eos_id, temperature=temperature,
                           top_p=top_p, seed=seed, kv_cache=kv_cache, src=src)
        result = {"prompt": text, "completion": completion_text(tokenizer, prompt_ids, new), "tokens": new}
        results.append(result)
        if each is not None:
            each(result)
    return results
