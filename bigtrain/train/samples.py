"""In-loop samples as a callback: at each evaluation, the training model continues each of `train.sample_prompts`
greedily (up to `train.sample_max_new_tokens` new tokens) and the text is logged to TensorBoard (`samples/<i>`)
and events.jsonl (event `sample` {prompt, completion}).

Training is not perturbed: greedy decoding draws no random numbers, the forward runs in eval mode (no dropout)
under no_grad, the data position is not touched, and the model goes back to the mode it was in. Every rank runs
the generation (it is collective: pipeline stages, TP gathers, the token broadcast); rank 0 writes. The prefix
is re-encoded for every new token (no KV cache on the training model; see bigtrain/eval/generate.py and
bigtrain/eval/decode.py).
"""
from __future__ import annotations

import logging

from .callbacks import Callback

log = logging.getLogger("bigtrain")


class Samples(Callback):
    def __init__(self, cfg):
        self.cfg = cfg
        self.tokenizer = None

    def on_start(self, trainer):
        t = self.cfg.train
        if not t.sample_prompts:
            return
        if not (t.eval_interval and self.cfg.data.validation):
            log.warning("train.sample_prompts: samples are generated at each evaluation, and this run has none "
                        "(set train.eval_interval and data.validation)")
        if not self.cfg.data.tokenizer:
            log.warning("train.sample_prompts: the run names no data.tokenizer; no samples")
            return
        from ..data.tokenizer import load_tokenizer
        self.tokenizer = load_tokenizer(self.cfg.data.tokenizer)

    def on_evaluation(self, trainer, results):
        if self.tokenizer is None or not self.cfg.train.sample_prompts:
            return
        import torch

        from ..eval.decode import generate
        model = trainer.engine.module
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                samples = generate(model, self.cfg, self.tokenizer, list(self.cfg.train.sample_prompts),
                                   max_new_tokens=self.cfg.train.sample_max_new_tokens, temperature=0.0,
                                   kv_cache=False)
        finally:
            model.train(was_training)
        for i, s in enumerate(samples):
            trainer.metrics.text(f"samples/{i}", _markdown(s["prompt"], s["completion"]), trainer.step)
            trainer.metrics.event("sample", trainer.step, prompt=s["prompt"], completion=s["completion"])


def _markdown(prompt: str, completion: str) -> str:
    """TensorBoard renders text as markdown: the sample as a code block, the prompt in bold above it."""
    fence = "````" if "```" in prompt + completion else "```"
    return f"**prompt:** `{prompt!r}`\n\n{fence}\n{prompt}{completion}\n{fence}"
