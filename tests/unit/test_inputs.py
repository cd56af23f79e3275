"""Input formats of `bigtrain shards` (parquet, zstd, gzip, jsonl, text), their one-line errors, and the exact cuts
of a large document: real stdlib text, the sentencepiece model the data tests train (conftest.py `tokenizer`)."""
import filecmp
import glob
import gzip
import io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import zstandard

from bigtrain.cli import main
from bigtrain.data import inputs, load_tokenizer, write_shards
from bigtrain.data.tokenizer import iter_documents

SEQ = 32


def _docs(stdlib, chinese):
    docs = [open(f, encoding="utf-8", newline="").read() for f in sorted(glob.glob(f"{stdlib}/json/*.py"))]
    return docs + chinese + [""]  # an empty document too: it still gets its EOS


def _rows(d):
    urls = [os.path.join(d, s["name"]) for s in json.load(open(os.path.join(d, "manifest.json")))["shards"]]
    return np.concatenate([x["npy"] for x in wds.WebDataset(urls, shardshuffle=False).decode()]).reshape(-1)


def _same_dirs(a, b):
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and filecmp.cmpfiles(a, b, names, shallow=False)[0] == names


def _shards(tokenizer, inputs_, out, workers=1, **kw):
    return write_shards(tokenizer=tokenizer, inputs=inputs_, output=str(out), seq_len=SEQ, samples_per_member=4,
                        shard_samples=16, workers=workers, **kw)


def test_parquet_and_zstd_give_the_shards_of_the_same_jsonl(tokenizer, stdlib, chinese, tmp_path):
    docs = _docs(stdlib, chinese)
    lines = "".join(json.dumps({"id": i, "body": d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    (tmp_path / "d.jsonl").write_text(lines, encoding="utf-8")
    half = lines.encode().index(b"\n", len(lines) // 2) + 1  # two zstd frames, as `cat a.zst b.zst` makes
    z = zstandard.ZstdCompressor(level=3)
    (tmp_path / "d.jsonl.zst").write_bytes(z.compress(lines.encode()[:half]) + z.compress(lines.encode()[half:]))
    with z.stream_writer(open(tmp_path / "d.ndjson.zstd", "wb")) as f:  # streamed: no content size in the header
        f.write(lines.encode())
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), tmp_path / "d.parquet", row_group_size=5)
    pq.write_table(pa.table({"body": pa.array(docs, pa.large_string())}), tmp_path / "large.parquet",
                   row_group_size=7, compression="zstd")
    pq.write_table(pa.table({"body": pa.array(docs).dictionary_encode()}), tmp_path / "dict.parquet")
    for name in ("d.jsonl", "d.jsonl.zst", "d.ndjson.zstd", "d.parquet", "large.parquet", "dict.parquet"):
        assert list(iter_documents(str(tmp_path / name), "body")) == docs, name
        _shards(tokenizer, [str(tmp_path / name)], tmp_path / f"out-{name}", text_key="body")
    for name in ("d.jsonl.zst", "d.ndjson.zstd", "d.parquet", "large.parquet", "dict.parquet"):
        assert _same_dirs(tmp_path / "out-d.jsonl", tmp_path / f"out-{name}"), name
    # a text file in zstd is one document, like the plain file
    (tmp_path / "t.txt").write_text(docs[0], encoding="utf-8")
    (tmp_path / "t.txt.zst").write_bytes(z.compress(docs[0].encode()))
    assert list(iter_documents(str(tmp_path / "t.txt.zst"))) == [docs[0]]
    # parquet batches: about CHUNK bytes each, rows in order, compact when pickled
    batches = list(inputs.parquet_batches(str(tmp_path / "d.parquet"), "body"))
    assert [r for _, r in batches] == list(np.cumsum([0] + [len(a) for a, _ in batches[:-1]]))


@pytest.fixture(scope="module")
def bad(tmp_path_factory, stdlib):
    d = tmp_path_factory.mktemp("bad")
    good = pa.table({"text": ["a b c"] * 50, "n": list(range(50))})
    pq.write_table(good.rename_columns(["body", "n"]), d / "nocol.parquet")
    pq.write_table(pa.table({"text": list(range(10))}), d / "ints.parquet")
    pq.write_table(pa.table({"text": pa.array(["x"] * 10, pa.binary())}), d / "bytes.parquet")
    pq.write_table(pa.table({"text": ["a"] * 7 + [None] + ["b"] * 2}), d / "null.parquet", row_group_size=5)
    pq.write_table(good, d / "good.parquet")
    data = (d / "good.parquet").read_bytes()
    (d / "truncated.parquet").write_bytes(data[:len(data) // 2])
    (d / "garbage.parquet").write_bytes(b"PAR1" + os.urandom(200))
    (d / "garbage.jsonl.zst").write_bytes(b"this is not zstd\n" * 10)
    z = zstandard.ZstdCompressor().compress(("{\"text\": \"x\"}\n" * 5000).encode())
    (d / "truncated.jsonl.zst").write_bytes(z[:len(z) * 2 // 3])
    (d / "garbage.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(100))
    (d / "data.parquet.gz").write_bytes(gzip.compress(data))
    lines = [json.dumps({"text": f"line {i}"}) for i in range(3000)]
    lines[2500] = '{"text": 12}'
    (d / "int.jsonl").write_text("\n".join(lines) + "\n")
    lines[2500] = '{"text": "unterminated'
    (d / "broken.jsonl").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    return d


@pytest.mark.parametrize("name, workers, expected", [
    ("nocol.parquet", 1, r"nocol.parquet: no column 'text' \(columns: body, n; set --text-key\)"),
    ("ints.parquet", 1, r"ints.parquet: column 'text' is int64, expected a string column"),
    ("bytes.parquet", 1, r"bytes.parquet: column 'text' is binary, expected a string column"),
    ("null.parquet", 2, r"null.parquet: row 7 \(from 0\): column 'text' is null, expected a string"),
    ("truncated.parquet", 1, r"cannot read input \S*truncated.parquet: not a valid parquet file"),
    ("garbage.parquet", 2, r"cannot read input \S*garbage.parquet: not a valid parquet file"),
    ("garbage.jsonl.zst", 1, r"cannot read input \S*garbage.jsonl.zst: not a valid zstd stream"),
    ("truncated.jsonl.zst", 2, r"cannot read input \S*truncated.jsonl.zst: the zstd stream ends inside a frame"),
    ("garbage.jsonl.gz", 1, r"cannot read input \S*garbage.jsonl.gz: not a valid gzip stream"),
    ("data.parquet.gz", 1, r"input \S*data.parquet.gz: a parquet file compresses its own pages"),
    ("int.jsonl", 2, r"int.jsonl:2501: field 'text' is int, expected a string"),
    ("broken.jsonl", 1, r"broken.jsonl:2501: not valid JSON \(Invalid control character"),
])
def test_input_errors_are_one_line_naming_the_file(bad, tokenizer, tmp_path, capsys, monkeypatch, name, workers,
                                                   expected):
    monkeypatch.setattr(inputs, "CHUNK", 4096)  # several byte ranges per jsonl file: the line number still counts
    with pytest.raises(SystemExit) as e:
        main(["shards", "--tokenizer", tokenizer, "--input", str(bad / name), "--output", str(tmp_path / "out"),
              "--seq-len", "8", "--workers", str(workers)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("bigtrain: error: ")
    assert re.search(expected, err), err


def _stdlib_text(stdlib, chars):
    out, n = [], 0
    for f in sorted(glob.glob(f"{stdlib}/*.py")):
        out.append(open(f, encoding="utf-8", newline="").read())
        n += len(out[-1])
        if n >= chars:
            break
    return "".join(out)


def test_large_document_cuts_keep_every_id(tokenizer, stdlib, chinese):
    tok = load_tokenizer(tokenizer)
    text = _stdlib_text(stdlib, 600_000) + " ".join(chinese) + " end "
    assert tok.can_cut
    pieces = tok.pieces(text, 20_000)
    assert len(pieces) > 20 and "".join(pieces).count(" ") == text.count(" ") - (len(pieces) - 1)
    assert np.array_equal(tok.encode_many(pieces), tok.encode(text))
    assert np.array_equal(tok.encode_many(tok.pieces(text, 1_000_000)), tok.encode(text))


def _sp_model(tmp_path, stdlib, name, **options):
    import sentencepiece as spm
    lines = [s for f in sorted(glob.glob(f"{stdlib}/json/*.py")) for s in open(f).read().splitlines() if s.strip()]
    m = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=m, vocab_size=600, byte_fallback=True,
                                   minloglevel=2, **{"model_type": "bpe", "remove_extra_whitespaces": False,
                                                     "normalization_rule_name": "identity", **options})
    (tmp_path / name).write_bytes(m.getvalue())
    return load_tokenizer(str(tmp_path / name))


def test_cuts_avoid_pieces_that_span_a_space_and_models_without_proof_are_not_cut(tmp_path, stdlib):
    # "def\u2581" is a piece: a cut between "def" and its space would change the ids, so no cut lands there
    tok = _sp_model(tmp_path, stdlib, "udef.model", user_defined_symbols=["def\u2581"])
    text = "def f():\n    def g(): pass\n" * 3000
    assert tok.can_cut and "f" in tok._cut_rule()[0]
    pieces = tok.pieces(text, 1000)
    assert len(pieces) > 10 and not any(p.endswith("def") for p in pieces[:-1])
    assert np.array_equal(tok.encode_many(pieces), tok.encode(text))
    p = 27 * 185 + 16  # the space after a "def": the same cut there (dropping the space) changes the ids
    assert text[p - 3:p + 1] == "def " and not np.array_equal(tok.encode_many([text[:p], text[p + 1:]]),
                                                              tok.encode(text))
    assert np.array_equal(tok.encode_many([text[:p - 4], text[p - 3:]]), tok.encode(text))  # after the indent
    # a normalization table, removal of extra whitespace, a unigram model: no proof, so no cut
    for name, opts in (("nfkc.model", dict(normalization_rule_name="nmt_nfkc")),
                       ("strip.model", dict(remove_extra_whitespaces=True)),
                       ("unigram.model", dict(model_type="unigram"))):
        tok = _sp_model(tmp_path, stdlib, name, **opts)
        assert not tok.can_cut and tok.pieces(text, 1000) == [text], name


def test_shards_byte_identical_for_1_and_2_workers_and_equal_to_plain_encoding(tokenizer, stdlib, chinese,
                                                                                 tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "CHUNK", 1 << 13)  # small tasks: many byte ranges, blobs and pieces
    monkeypatch.setattr(inputs, "MIN_PIECE", 1 << 11)
    small = sorted(glob.glob(f"{stdlib}/email/*.py"))
    big = tmp_path / "big.txt"
    big.write_text(_stdlib_text(stdlib, 300_000), encoding="utf-8", newline="")
    docs = _docs(stdlib, chinese)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n\n" for d in docs))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": d}) + "\r\n" for d in docs))
    files = small[:5] + [str(big), str(tmp_path / "d.jsonl")] + small[5:] + [str(tmp_path / "d.jsonl.gz")]
    tok = load_tokenizer(tokenizer)
    tasks = [t[0] for t in inputs.plan_tasks(files, "text", tok, 2)]
    assert tasks.count("piece") > 10 and tasks.count("lines") > 3 and tasks.count("blob") > 3 and "files" in tasks
    for w in (1, 2):
        m = _shards(tokenizer, files, tmp_path / f"w{w}", workers=w)
    assert _same_dirs(tmp_path / "w1", tmp_path / "w2")
    text = [open(f, encoding="utf-8", newline="").read() for f in small + [str(big)]]
    every = text[:5] + [text[-1]] + docs + text[5:-1] + docs
    plain = [i for d in every for i in tok.encode(d) + [tok.eos_id]]
    assert m["documents"] == len(every) and m["tokens"] + m["dropped_tokens"] == len(plain)
    assert np.array_equal(_rows(str(tmp_path / "w2")), plain[:m["tokens"]])
