"""`bigtrain shards --format chat`: conversations -> shards of token words with a loss mask (bigtrain.data.words).

Each jsonl line `{"messages": [{"role": ..., "content": ...}, ...]}` is rendered by the tokenizer's own chat
template (`chat_template` in the tokenizer_config.json beside the tokenizer.json, or chat_template.jinja there).
Trained: the tokens an assistant message adds (its content and end-of-turn token); not trained: everything else
(system and user turns, the assistant's role header, a newline the template puts after the end-of-turn token).
The mask comes from the template's `{% generation %}` markers when it has them, else from prefixes: the renderings
of messages[:1], messages[:2], ... must each be a token prefix of the next, and a template that breaks this is
refused. Conversations are packed whole, in input order, into samples of seq_len + 1 words; the rest of a sample
is padding (pad token, else EOS; not trained; a document of its own). A conversation without an assistant turn is
dropped; one longer than a sample is dropped or truncated (`too_long`). All counted in the manifest.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sys

import numpy as np

from ..errors import BigtrainError
from . import words
from .shards import ShardWriter
from .inputs import input_format, jsonl_records
from .tokenizer import expand_inputs, load_tokenizer

TOO_LONG = ("drop", "truncate")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class ChatTokenizer:
    """An HF tokenizer.json with its chat template: `encode(messages, where)` -> (ids, trained) or None."""

    def __init__(self, path: str):
        self.path = path
        d = os.path.dirname(os.path.abspath(path))
        cfg_path, jinja = os.path.join(d, "tokenizer_config.json"), os.path.join(d, "chat_template.jinja")
        config = {}
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if not template and os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        if not template:
            raise BigtrainError(f"{path}: no chat template (no 'chat_template' in {cfg_path}, no {jinja}): "
                                "--format chat renders conversations with the tokenizer's own template")
        from transformers import PreTrainedTokenizerFast
        specials = {k: v["content"] if isinstance(v, dict) else v for k in ("bos_token", "eos_token", "unk_token",
                    "pad_token") if (v := config.get(k))}
        self.hf = PreTrainedTokenizerFast(tokenizer_file=path, chat_template=template, **specials)
        self.template_sha256 = hashlib.sha256(template.encode()).hexdigest()
        self.method = "generation" if "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}") \
            else "prefixes"
        self.special = {i for i, t in self.hf.backend_tokenizer.get_added_tokens_decoder().items() if t.special}
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id

    def render(self, messages, where: str, generation_prompt: bool = False) -> list[int]:
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:
            raise BigtrainError(f"{where}: the chat template of {self.path} failed: {_first_line(e)}") from None
        return self.hf.encode(text, add_special_tokens=False)

    def encode(self, messages: list[dict], where: str):
        """(ids, trained) of one conversation as int64 / bool arrays, or None when nothing in it is trained."""
        if not any(m["role"] == "assistant" for m in messages):
            return None
        if self.method == "generation":
            try:
                out = self.hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
            except Exception as e:
                raise BigtrainError(f"{where}: the chat template of {self.path} failed: {_first_line(e)}") from None
            ids, trained = np.array(out["input_ids"], np.int64), np.array(out["assistant_masks"], bool)
        else:
            ids, trained = self._prefix_mask(messages, where)
        if not trained.any():
            return None
        if trained.all():
            raise BigtrainError(f"{where}: the chat template of {self.path} gives every token of this conversation "
                                "to the assistant: refusing an all-trained loss mask")
        return ids, trained

    def _prefix_mask(self, messages, where):
        full = self.render(messages, where)
        trained = np.zeros(len(full), bool)
        prev = []
        for k, m in enumerate(messages):
            cur = full if k == len(messages) - 1 else self.render(messages[:k + 1], where)
            if cur[:len(prev)] != prev:
                raise BigtrainError(
                    f"{where}: chat template of {self.path} does not render conversations as a sequence of prefixes "
                    f"(messages[:{k}] is not a token prefix of messages[:{k + 1}]), so the tokens of each message "
                    "cannot be told apart: use a template with {% generation %} markers")
            if m["role"] == "assistant":
                start, end = self._header_end(messages, k, prev, cur, where), len(cur)
                last = max((i for i in range(start, end) if cur[i] in self.special), default=None)
                if last is not None and not self.hf.decode(cur[last + 1:end]).strip():
                    end = last + 1  # whitespace after the end-of-turn token: not trained
                trained[start:end] = True
            prev = cur
        return np.array(full, np.int64), trained

    def _header_end(self, messages, k, prev, cur, where) -> int:
        """Where assistant message k's own tokens start in `cur` (after its role header): the end of the
        generation prompt when that extends messages[:k] and prefixes messages[:k+1] (k > 0), else the end of what
        the message renders to whatever its content (the common prefix with its rendering with empty content)."""
        gen = self.render(messages[:k], where, generation_prompt=True) if k else []
        if len(prev) < len(gen) <= len(cur) and gen[:len(prev)] == prev and cur[:len(gen)] == gen:
            return len(gen)
        empty = self.render(messages[:k] + [{**messages[k], "content": ""}], where)
        n = len(prev)
        while n < min(len(empty), len(cur)) and empty[n] == cur[n]:
            n += 1
        return n


def iter_conversations(files, key: str = "messages"):
    """("path:line", messages) of each non-empty line of the jsonl `files` (plain, .gz or .zst)."""
    for path in files:
        if input_format(path)[0] != "jsonl":
            raise BigtrainError(f"{path}: --format chat reads .jsonl files (optionally .gz or .zst), one "
                                f'{{"{key}": [{{"role": ..., "content": ...}}, ...]}} per line')
        for where, messages in jsonl_records(path, key):
            if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                         for m in messages):
                raise BigtrainError(f"{where}: {key!r} must be a list of messages "
                                    '{"role": ..., "content": ...}')
            yield where, messages


class Packer:
    """Whole conversations into samples of `sample_len` words, greedily in order; `add` and `close` return the
    finished samples as a flat uint32 array (a multiple of sample_len words)."""

    def __init__(self, sample_len: int, pad_id: int):
        self.sample_len, self.pad_id, self.padding = sample_len, pad_id, 0
        self._parts = []  # (ids, trained) of the sample being filled
        self._len = 0

    def add(self, ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
        assert 0 < len(ids) <= self.sample_len
        out = self.close() if self._len + len(ids) > self.sample_len else np.zeros(0, np.uint32)
        self._parts.append((ids, trained))
        self._len += len(ids)
        return out

    def close(self) -> np.ndarray:
        if not self._parts:
            return np.zeros(0, np.uint32)
        pad = self.sample_len - self._len
        self.padding += pad
        parts = self._parts + ([(np.full(pad, self.pad_id, np.int64), np.zeros(pad, bool))] if pad else [])
        starts = np.zeros(self.sample_len, bool)
        starts[np.cumsum([0] + [len(i) for i, _ in parts[:-1]])] = True
        self._parts, self._len = [], 0
        return words.pack(np.concatenate([i for i, _ in parts]), np.concatenate([t for _, t in parts]), starts)


def write_chat_shards(tokenizer: str, inputs, output: str, seq_len: int, messages_key: str = "messages",
                      too_long: str = "drop", samples_per_member: int = 64, shard_samples: int = 8192) -> dict:
    """Conversations in `inputs` (.jsonl, .jsonl.gz) -> chat shards in `output`; returns the manifest."""
    from tqdm import tqdm

    if too_long not in TOO_LONG:
        raise BigtrainError(f"--too-long {too_long}: expected one of {', '.join(TOO_LONG)}")
    if not tokenizer.endswith(".json"):
        raise BigtrainError(f"--format chat needs an HF tokenizer.json with a chat template, got {tokenizer}")
    tok = load_tokenizer(tokenizer)
    chat = ChatTokenizer(tokenizer)
    if chat.pad_id is None:
        raise BigtrainError(f"{tokenizer}: no pad or EOS token to pad samples with")
    files = expand_inputs(inputs)
    L = seq_len + 1
    writer = ShardWriter(output, seq_len, tok.vocab_size, samples_per_member, shard_samples, eos_id=tok.eos_id,
                         tokenizer=dict(file=os.path.basename(tokenizer), sha256=tok.sha256), token_flags=True)
    packer = Packer(L, chat.pad_id)
    n = collections.Counter()
    with tqdm(desc=f"rendering {len(files)} files", unit="conv", file=sys.stderr, mininterval=0.5) as bar:
        for where, messages in iter_conversations(files, messages_key):
            n["conversations"] += 1
            bar.update()
            enc = chat.encode(messages, where)
            if enc is None:
                n["no_assistant"] += 1
                continue
            ids, trained = enc
            if len(ids) > L:
                n["too_long"] += 1
                ids, trained = ids[:L], trained[:L]
                if too_long == "drop" or not trained.any():
                    continue
            n["trained_tokens"] += int(trained.sum())
            writer.add(packer.add(ids, trained), documents=1)
    writer.add(packer.close())
    kept = writer.manifest["documents"]
    if not kept:
        raise BigtrainError(f"{output}: no conversation to write ({n['conversations']} read: {n['no_assistant']} "
                            f"without an assistant turn, {n['too_long']} longer than seq_len + 1 = {L})")
    writer.manifest.update(format_kind="chat", messages_key=messages_key, mask_method=chat.method,
                           chat_template_sha256=chat.template_sha256, pad_id=chat.pad_id,
                           conversations=n["conversations"], dropped=n["conversations"] - kept,
                           no_assistant=n["no_assistant"], too_long=n["too_long"], too_long_policy=too_long,
                           trained_tokens=n["trained_tokens"], padding_tokens=packer.padding)
    m = writer.close()
    print(f"wrote {len(m['shards'])} shards to {output}: {kept} of {n['conversations']} conversations "
          f"({n['no_assistant']} without an assistant turn, {n['too_long']} too long: {too_long}), {m['samples']} "
          f"samples, {m['trained_tokens']} of {m['tokens']} tokens trained, {m['padding_tokens']} padding",
          file=sys.stderr)
    return m
