"""Tokenizers (a sentencepiece `.model` or an HF `tokenizer.json` behind one small class), training a
sentencepiece BPE for English, Chinese and code, and reading the text inputs of `bigtrain tokenizer train`
and `bigtrain shards`: files or globs (`**` recursive; `exclude:PATTERN` removes its matches) of
plain text (one document per file), `.jsonl` (one document per line, in a text field) and `.gz` of either.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import sys

from ..errors import BigtrainError

_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<｜end▁of▁sentence｜>", "<|eot_id|>")
_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "<｜begin▁of▁sentence｜>", "<|startoftext|>")


class Tokenizer:
    """encode(text) -> ids (no BOS/EOS added), decode(ids) -> text, vocab_size, eos_id, bos_id (None when the
    vocabulary has none), sha256 of the file."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BigtrainError(f"cannot read tokenizer {self.path}: {e.strerror}") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._sp = self._hf = None
        if self.path.endswith(".json"):
            from tokenizers import Tokenizer as HFTokenizer
            try:
                self._hf = HFTokenizer.from_str(data.decode("utf-8"))
            except Exception as e:
                raise BigtrainError(f"{self.path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
            vocab = self._hf.get_vocab(with_added_tokens=True)
            self.vocab_size = max(vocab.values()) + 1
            self.eos_id, self.bos_id = _hf_specials(self._hf, self.path, vocab)
        else:
            import sentencepiece as spm
            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.LoadFromSerializedProto(data)
            except Exception:
                raise BigtrainError(f"{self.path}: not a sentencepiece model (expected a .model file or a tokenizer.json)") from None
            self.vocab_size = self._sp.get_piece_size()
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _hf_specials(hf, path, vocab):
    """EOS/BOS ids: from a tokenizer_config.json beside the file, else the usual special-token names."""
    names = {}
    cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.exists(cfg):
        with open(cfg) as f:
            c = json.load(f)
        for k in ("eos_token", "bos_token"):
            t = c.get(k)
            names[k] = t.get("content") if isinstance(t, dict) else t
    eos = vocab.get(names.get("eos_token")) if names.get("eos_token") else next((vocab[t] for t in _EOS if t in vocab), None)
    bos = vocab.get(names.get("bos_token")) if names.get("bos_token") else next((vocab[t] for t in _BOS if t in vocab), None)
    return eos, bos


def load_tokenizer(path: str) -> Tokenizer:
    """A sentencepiece `.model` or an HF `tokenizer.json`."""
    return Tokenizer(path)


# ---------------------------------------------------------------------------------------------- text inputs

def expand_inputs(patterns) -> list[str]:
    """Files named by `patterns` in order (globs sorted, `**` recursive, duplicates dropped); `exclude:PATTERN`
    removes the files PATTERN matches (e.g. `exclude:/usr/lib/python3.11/site-packages/**`). (Not `!PATTERN`:
    interactive bash would take it for history expansion inside double quotes.)"""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    ex = "exclude:"
    excluded = {os.path.normpath(f) for p in patterns if p.startswith(ex) for f in glob.glob(p[len(ex):], recursive=True)}
    files = {}
    for p in patterns:
        if p.startswith(ex):
            continue
        if any(c in p for c in "*?["):
            found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not found:
                raise BigtrainError(f"input pattern {p!r} matches no file")
        elif os.path.isfile(p):
            found = [p]
        elif os.path.isdir(p):
            raise BigtrainError(f"input {p} is a directory: give files or a glob such as '{p.rstrip('/')}/**/*.txt'")
        else:
            raise BigtrainError(f"input file {p} does not exist")
        files.update((f, None) for f in found if os.path.normpath(f) not in excluded)
    if not files:
        raise BigtrainError(f"no input files left after exclusions: {' '.join(patterns)}")
    return list(files)


def is_jsonl(path: str) -> bool:
    return path.removesuffix(".gz").endswith((".jsonl", ".ndjson"))


def iter_documents(path: str, text_key: str = "text"):
    """The documents of one input file: the whole file for text, one per line (field `text_key`) for .jsonl."""
    raw = gzip.open(path) if path.endswith(".gz") else open(path, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="") as f:
        try:
            if not is_jsonl(path):
                yield f.read()
                return
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_key]
                except json.JSONDecodeError as e:
                    raise BigtrainError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                except (KeyError, TypeError, IndexError):
                    raise BigtrainError(f"{path}:{n}: no text field {text_key!r} (set --text-key)") from None
                if not isinstance(text, str):
                    raise BigtrainError(f"{path}:{n}: field {text_key!r} is {type(text).__name__}, expected a string")
                yield text
        except (OSError, EOFError) as e:
            raise BigtrainError(f"cannot read input {path}: {e}") from None


# ---------------------------------------------------------------------------------------------- training

def train_tokenizer(inputs, vocab_size: int, output: str, max_sentences: int = 2_000_000) -> str:
    """Train a sentencepiece BPE (byte fallback, split digits, whitespace kept for code, identity normalisation
    so decode(encode(s)) == s) on the lines of `inputs`; writes OUTPUT.model and OUTPUT.vocab, returns the
    .model path. Deterministic: inputs are read in order and the sampling seed is fixed."""
    import sentencepiece as spm

    files = expand_inputs(inputs)
    if vocab_size < 260:
        raise BigtrainError(f"--vocab-size {vocab_size}: expected at least 260 (256 byte pieces + specials)")

    def lines():
        for path in files:
            for doc in iter_documents(path):
                for line in doc.splitlines():
                    if line.strip():
                        yield line

    model = io.BytesIO()  # written by us: the model file then depends on the inputs alone, not on the output path
    spm.set_random_generator_seed(1234)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, character_coverage=0.9995, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity", input_sentence_size=max_sentences,
            shuffle_input_sentence=True, max_sentence_length=16384, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=16, minloglevel=2)  # a fixed thread count: it is recorded in the model file
    except RuntimeError as e:
        raise BigtrainError(f"sentencepiece training failed: {str(e).strip().splitlines()[-1]}") from None
    from ..atomic import atomic_write
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with atomic_write(output + ".vocab") as f:
        f.writelines(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    with atomic_write(output + ".model", "wb") as f:  # last: a complete .model means a complete tokenizer
        f.write(model.getvalue())
    tok = Tokenizer(output + ".model")
    print(f"wrote {output}.model and {output}.vocab (vocab {tok.vocab_size}, {len(files)} input files, "
          f"sha256 {tok.sha256[:12]})", file=sys.stderr)
    return output + ".model"
