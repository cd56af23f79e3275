"""Tokenizers (a sentencepiece `.model` or an HF `tokenizer.json` behind one small class), training a
sentencepiece BPE for English, Chinese and code, and naming the inputs of `bigtrain tokenizer train` and
`bigtrain shards`: files or globs (`**` recursive; `exclude:PATTERN` removes its matches) of plain text (one
document per file), `.jsonl` (one document per line, in a text field), `.parquet` (one per row, in a string
column) and `.gz` / `.zst` of text or jsonl (reading them: inputs.py).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import sys

import numpy as np

from ..errors import BigtrainError
from .inputs import iter_documents  # noqa: F401  (the input formats: inputs.py)

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
        self._model, self._cut = (data if self._sp is not None else None), False  # _cut: see _cut_rule()

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def encode_many(self, texts, eos: int | None = None, dtype=np.uint32) -> np.ndarray:
        """encode() of each text, each followed by `eos` when given, concatenated into one array of `dtype`.
        One thread: `bigtrain shards` runs one tokenizer process per core."""
        if self._sp is not None:
            if _SP_NUMPY:
                arrays = self._sp.encode(list(texts), num_threads=1, return_type="numpy")
            else:
                arrays = [np.array(x, np.int64) for x in self._sp.encode(list(texts), num_threads=1)]
        else:
            arrays = [np.array(self._hf.encode(t, add_special_tokens=False).ids, np.int64) for t in texts]
        if eos is not None:
            e = np.array([eos], np.int64)
            arrays = [x for a in arrays for x in (a, e)]
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

    @property
    def can_cut(self) -> bool:
        """Whether `pieces` can cut a text (the tokenizer is one whose exact cut points are known)."""
        return self._cut_rule() is not None

    def pieces(self, text: str, size: int) -> list[str]:
        """`text` cut into pieces of about `size` characters (or more) whose encodings, concatenated, are exactly
        encode(text): cuts fall only at spaces the vocabulary proves safe (`_sp_cut_rule`). [text] when the
        tokenizer gives no such guarantee (HF tokenizer.json files, normalizing or unigram sentencepiece models)."""
        rule = self._cut_rule()
        if rule is None or len(text) <= size:
            return [text]
        before_ws, ws, drop = rule
        out, start, n = [], 0, len(text)
        p = text.find(" ", size)
        while 0 < p < n - 1:
            if (ws if text[p - 1] == " " else text[p - 1]) in before_ws:  # a piece spans this space: not here
                p = text.find(" ", p + 1)
                continue
            out.append(text[start:p])
            start = p + 1 if drop else p  # with a dummy prefix the next piece's own prefix stands for this space
            p = text.find(" ", p + size)
        out.append(text[start:])
        return out

    def _cut_rule(self):
        if self._cut is False:
            self._cut = _sp_cut_rule(self._model, self._sp) if self._sp is not None else None
        return self._cut

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _sp_numpy() -> bool:
    try:
        import inspect
        import sentencepiece as spm
        return "return_type" in inspect.signature(spm.SentencePieceProcessor.Encode).parameters
    except (ImportError, TypeError, ValueError):
        return False


_SP_NUMPY = _sp_numpy()  # sentencepiece >= 0.2.1 returns int32 arrays (no Python list of ints)


def _proto_fields(buf: bytes, only=None) -> dict:
    """{field number: [values]} of one protobuf message (varints as int, length-delimited fields as bytes);
    with `only`, other length-delimited fields are skipped unread (a model's pieces: one per vocabulary entry)."""
    out, i, n = {}, 0, len(buf)

    def varint():
        nonlocal i
        v = shift = 0
        while True:
            b = buf[i]
            i += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return v
    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            v = varint()
        elif wire == 2:
            size = buf[i]  # a length under 128 is one byte
            i, size = (i + 1, size) if size < 0x80 else (i, varint())
            v, i = (buf[i:i + size] if only is None or field in only else None), i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            v, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        out.setdefault(field, []).append(v)
    return out


def _sp_cut_rule(model: bytes, sp):
    """(before_ws, ws, drop) when a sentencepiece model provably gives encode(text) == encode(text[:p]) +
    encode(text[p + drop:]) at a space text[p] whose left neighbour (as normalized) is not in before_ws; None
    when the model gives no such guarantee.

    The proof. With no normalization table (precompiled_charsmap empty, as "identity" models such as Llama 2's
    and the ones `bigtrain tokenizer train` writes have), extra whitespace kept and the whitespace mark as a
    prefix, the normalized text is [ws +] text with each ' ' replaced by ws ('\u2581'), character for character.
    A BPE model encodes it by splitting it into characters (user-defined pieces matched longest-first, left to
    right), merging adjacent symbols into vocabulary pieces, and spelling unknown characters as bytes. A piece
    covering the boundary between normalized characters a and b contains "ab"; when no piece of the vocabulary
    contains a + ws (byte and control pieces hold no ws), no symbol ever covers the boundary in front of a
    space that follows a, and the merges on either side are exactly those of each side encoded alone. The
    dummy prefix: encoding text[p + 1:] alone normalizes to ws + text[p + 1:] == the normalized text[p:], so a
    piece after a cut drops its leading space (drop = 1) when the model adds that prefix. Unigram models
    (Viterbi over float sums) are not cut: a different constant offset could round a near tie the other way.
    """
    try:
        top = _proto_fields(model, only=(2, 3))
        trainer = _proto_fields(top.get(2, [b""])[0])
        norm = _proto_fields(top.get(3, [b""])[0])
    except (ValueError, IndexError):
        return None
    flag = lambda m, f, default: bool(m[f][-1]) if f in m else default  # noqa: E731
    model_type = trainer[3][-1] if 3 in trainer else 1
    if (model_type != 2 or flag(trainer, 24, False) or norm.get(2, [b""])[-1] or flag(norm, 4, True)):
        return None  # not BPE, whitespace as suffix, a normalization table, or extra whitespace removed
    ws = "\u2581" if flag(norm, 5, True) else " "
    if sp.piece_to_id(ws) == sp.unk_id():
        return None
    before_ws = set()  # every piece counts, also byte and control ones (which hold no ws): a superset is safe
    for w in sp.id_to_piece(list(range(sp.get_piece_size()))):
        if ws in w[1:]:
            before_ws.update(w[k - 1] for k in range(1, len(w)) if w[k] == ws)
    return before_ws, ws, int(flag(norm, 3, True))


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
