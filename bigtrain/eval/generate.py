"""Sampling from a bigtrain checkpoint, and the generation behind `train.sample_prompts`.

    bigtrain generate runs/x --prompt "def main(" --max-new-tokens 64 --temperature 0.8 --top-p 0.95 --seed 1
    torchrun --nproc_per_node 2 --no-python bigtrain generate runs/x parallel.tensor=2 --prompt-file prompts.jsonl

The checkpoint loads into any TP x PP (x DP) layout (`load.py`). Rank 0 prints one JSON object per prompt on
stdout: {"prompt", "completion", "tokens"} (`tokens`: the completion's token ids; EOS ends it and is left out).
A prompt is encoded without BOS/EOS (as documents are in bigtrain's shards); `--temperature 0` is greedy
(argmax), otherwise temperature and top-p (nucleus) sampling from a `torch.Generator` seeded with `--seed` for
each prompt (a prompt's sample depends on the prompt, the seed and the model only, not on the layout or the
other prompts). Only token ids below the tokenizer's vocabulary size are ever chosen (the embedding's padded
rows are not tokens). Generation ends at EOS, after `--max-new-tokens`, or when prompt + completion fill
`model.seq_length` (a longer prompt keeps its last `seq_length - 1` tokens).

Every rank runs the same loop: the last pipeline stage holds the full-vocabulary logits (gathered over the
tensor-parallel ranks); one rank -- last stage, TP rank 0, DP rank 0 -- picks the next token and broadcasts it
to every rank, so all stages, shards and replicas continue with the same token.

Cost. `bigtrain generate` keeps a KV cache through megatron-core's `StaticInferenceContext`: the prompt is
encoded once (prefill), then each new token is one forward of a single position whose attention reads the
cached keys and values of every earlier position (P + N token-forwards for a P-token prompt and N new tokens,
plus attention over the cache; the cache holds 2 x layers x (P + N) x kv_heads x head_dim values per prompt).
bigtrain's SDPAttention aligns its causal mask bottom-right when the queries are fewer than the keys (the new
positions after the cached ones). The decoding itself lives in decode.py (the training loop uses it too). The
in-loop samples (bigtrain/train/samples.py, on the training model) re-encode the whole prefix for every new token
instead (`kv_cache=False`: N forwards of up to P + N positions, quadratic in length): that works under sequence
parallelism (a one-position decode step cannot be split over TP ranks; the prefix is right-padded to a multiple
of TP, harmless under a causal mask), and `train.sample_max_new_tokens` is small.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch.distributed as dist

from ..errors import BigtrainError
from .decode import generate

# --- the command ---------------------------------------------------------------------------------------------

def read_prompts(prompts, prompt_file: str | None) -> list[str]:
    """--prompt texts, then a --prompt-file's: one prompt per line, or a .jsonl of {"prompt": ...} (blank lines
    skipped; inside a plain text file `\\n` stands for a newline)."""
    out = list(prompts or [])
    if prompt_file:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise BigtrainError(f"cannot read prompt file {prompt_file}: {e.strerror}") from None
        jsonl = prompt_file.endswith((".jsonl", ".ndjson"))
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if not jsonl:
                out.append(line.replace("\\n", "\n"))
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise BigtrainError(f"{prompt_file}:{n}: not valid JSON ({e})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise BigtrainError(f'{prompt_file}:{n}: expected an object with a string field "prompt"')
            out.append(item["prompt"])
    if not out:
        raise BigtrainError("no prompt: give --prompt TEXT or --prompt-file FILE")
    return out


def main(src: str, prompts=(), prompt_file: str | None = None, overrides=(), max_new_tokens: int = 64,
         temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, kv_cache: bool = True, out=None) -> list[dict]:
    """`bigtrain generate`: every rank loads the checkpoint into its layout; rank 0 prints the results."""
    if max_new_tokens < 1:
        raise BigtrainError(f"--max-new-tokens {max_new_tokens}: expected >= 1")
    if temperature < 0:
        raise BigtrainError(f"--temperature {temperature}: expected >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise BigtrainError(f"--top-p {top_p}: expected 0 < top-p <= 1")
    from ..data.tokenizer import load_tokenizer
    from .load import load_for_inference

    texts = read_prompts(prompts, prompt_file)  # every rank, before the slow part: a bad file fails at once
    out = out or sys.stdout
    # stdout holds the results alone: DeepSpeed's logger, created on import, writes to sys.stdout as it is then;
    # a one-position decode step cannot be split over TP ranks: no sequence parallelism at inference
    with contextlib.redirect_stdout(sys.stderr):
        loaded = load_for_inference(src, [*overrides, "parallel.sequence_parallel=false"])
    if not loaded.tokenizer or not os.path.exists(loaded.tokenizer):
        raise BigtrainError(f"{loaded.path}: no tokenizer (the run names {loaded.tokenizer or 'none'} and none lies "
                            "beside the checkpoint); pass data.tokenizer=PATH")
    tokenizer = load_tokenizer(loaded.tokenizer)
    rank0 = dist.get_rank() == 0

    def emit(result):
        if rank0:
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()

    results = generate(loaded.model, loaded.cfg, tokenizer, texts, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=seed, kv_cache=kv_cache, each=emit)
    dist.barrier()
    return results
