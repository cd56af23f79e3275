"""Tokenizers: a sentencepiece BPE trained through the CLI on real English, code and Chinese text, an HF
tokenizer.json made by the `tokenizers` library, and the input globbing of the text tools."""
import hashlib
import os

import pytest

from bigtrain.cli import main
from bigtrain.config.schema import Config, DataSource
from bigtrain.data import check_data, load_tokenizer, train_tokenizer, write_shards
from bigtrain.data.tokenizer import expand_inputs
from bigtrain.errors import BigtrainError


@pytest.fixture(scope="module")
def samples(stdlib, chinese) -> list[str]:
    english = open(os.path.join(stdlib, "json", "__init__.py"), encoding="utf-8").read()
    code = open(os.path.join(stdlib, "textwrap.py"), encoding="utf-8").read()  # not in the training set
    return [english, code, *chinese, "混合 mixed 文本 with digits 2024 and\ttabs\n\n  indented  ",
            " leading space", "trailing spaces   ", "\r\nwindows\r\n", "emoji 😀 and rare 𠀋 chars", ""]


def test_trained_tokenizer_round_trips_english_chinese_and_code(tokenizer, samples, chinese):
    tok = load_tokenizer(tokenizer)
    assert tok.vocab_size == 1000 and tok.eos_id == 2 and tok.bos_id == 1
    assert tok.sha256 == hashlib.sha256(open(tokenizer, "rb").read()).hexdigest()
    for s in samples:
        ids = tok.encode(s)
        assert tok.eos_id not in ids and tok.bos_id not in ids
        assert tok.decode(ids) == s
    zh = "".join(chinese)
    assert len(tok.encode(zh)) < len(zh.encode("utf-8")) * 0.7  # common Chinese characters are pieces
    assert len(tok.encode("    return self._value\n")) <= 8  # whitespace runs and identifiers are pieces


def test_training_is_deterministic_and_learns_chinese(corpus, chinese, tmp_path):
    """On text with a larger Chinese share (json package + the Chinese documents), Chinese takes fewer tokens
    than characters; two trainings on the same input give the same model file."""
    paths = [train_tokenizer(corpus["b"], 800, str(tmp_path / f"t{i}")) for i in range(2)]
    assert open(paths[0], "rb").read() == open(paths[1], "rb").read()
    assert os.path.exists(tmp_path / "t0.vocab")
    tok, zh = load_tokenizer(paths[0]), "".join(chinese)
    assert tok.decode(tok.encode(zh)) == zh and len(tok.encode(zh)) < len(zh)
    with pytest.raises(BigtrainError, match="vocab-size 100"):
        train_tokenizer(corpus["b"], 100, str(tmp_path / "small"))


def test_cli_reports_input_mistakes_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", "--input", str(tmp_path / "*.txt"), "--vocab-size", "500", "--output",
              str(tmp_path / "t")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigtrain: error: input pattern") and "matches no file" in err and "\n" not in err


def test_hf_tokenizer_json(tmp_path, stdlib, samples):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    files = [os.path.join(stdlib, "json", f) for f in ("decoder.py", "encoder.py", "scanner.py")]
    hf.train(files, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)
    tok = load_tokenizer(path)
    assert tok.eos_id == 0 and tok.bos_id is None and tok.vocab_size == hf.get_vocab_size()
    for s in samples:
        assert tok.decode(tok.encode(s)) == s
    m = write_shards(tokenizer=path, inputs=files, output=str(tmp_path / "shards"), seq_len=16, workers=1)
    assert m["vocab_size"] == tok.vocab_size and m["tokenizer"] == {"file": "tokenizer.json", "sha256": tok.sha256}
    cfg = Config()
    cfg.data.sources, cfg.data.tokenizer = [DataSource(path=str(tmp_path / "shards"))], path
    cfg.model.seq_length = 16
    check_data(cfg)  # the manifest's tokenizer checksum and vocab match the config's tokenizer.json


def test_inputs_recursive_globs_and_exclusions(tmp_path):
    for p in ("a/x.txt", "a/b/y.txt", "a/b/c/z.jsonl.gz", "a/skip/w.txt", "top.txt"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text("x")
    got = expand_inputs([f"{tmp_path}/top.txt", f"{tmp_path}/a/**/*.txt", f"{tmp_path}/**/*.gz",
                         f"exclude:{tmp_path}/a/skip/**", f"{tmp_path}/top.txt"])
    rel = [os.path.relpath(p, tmp_path) for p in got]
    assert rel == ["top.txt", "a/b/y.txt", "a/x.txt", "a/b/c/z.jsonl.gz"]
    with pytest.raises(BigtrainError, match="is a directory"):
        expand_inputs([str(tmp_path / "a")])
    with pytest.raises(BigtrainError, match="does not exist"):
        expand_inputs([str(tmp_path / "nope.txt")])
