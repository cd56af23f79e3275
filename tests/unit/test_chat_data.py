"""Chat fine-tuning data: `bigtrain shards --format chat` (SmolLM2-135M-Instruct's real tokenizer and chat template,
tests/data/chat_small.jsonl), its loss masks checked token by token against the rendered template, packing and
the manifest's counts, refusals, determinism, `bigtrain data show` and the training loader on chat shards."""
import filecmp
import json
import os
import shutil

import numpy as np
import pytest

from bigtrain.cli import main
from bigtrain.data import words
from bigtrain.data.chat import ChatTokenizer, iter_conversations, write_chat_shards
from bigtrain.data.show import iter_rows, read_manifest, show
from bigtrain.errors import BigtrainError

CHAT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "chat_small.jsonl")
SEQ = 127  # samples of 128 tokens: one conversation of chat_small.jsonl (251 tokens) is too long, one has no reply
EOT = "<|im_end|>"
GENERATION_TEMPLATE = (  # SmolLM2's template with {% generation %} markers around each reply and its <|im_end|>
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok(smollm2):
    """SmolLM2's tokenizer.json, with its tokenizer_config.json and chat_template.jinja beside it."""
    return os.path.join(smollm2, "tokenizer", "tokenizer.json")


def tokenizer_dir(tok, path, template=None):
    """A copy of SmolLM2's tokenizer whose config has `template` as its chat template (none if None)."""
    os.makedirs(path)
    shutil.copy(tok, path)
    with open(os.path.join(os.path.dirname(tok), "tokenizer_config.json")) as f:
        config = json.load(f)
    if template is not None:
        config["chat_template"] = template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return os.path.join(path, "tokenizer.json")


def expected(hf, messages):
    """(ids, trained) computed independently: the rendered text tokenized with offsets; a token is trained iff its
    characters lie in an assistant message's content or the <|im_end|> right after it."""
    text = hf.apply_chat_template(messages, tokenize=False)
    spans, pos = [], 0
    for m in messages:
        start = text.index(m["content"], pos)
        pos = start + len(m["content"])
        if m["role"] == "assistant":
            assert text[pos:pos + len(EOT)] == EOT
            spans.append((start, pos + len(EOT)))
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], trained


def conversations():
    return list(iter_conversations([CHAT]))


def build(tok, out, *extra):
    main(["shards", "--format", "chat", "--tokenizer", tok, "--input", CHAT, "--output", str(out), "--seq-len",
          str(SEQ), "--samples-per-member", "2", "--shard-samples", "4", *extra])
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def rows(out):
    return np.stack(list(iter_rows(str(out), read_manifest(str(out)))))


def documents(r):
    """(ids, trained) of each document of the rows, padding documents included."""
    ids, trained, start, _ = words.unpack(r.reshape(-1))
    cuts = np.flatnonzero(start).tolist() + [len(ids)]
    return [(ids[a:b].tolist(), trained[a:b].tolist()) for a, b in zip(cuts, cuts[1:])]


# ---------------------------------------------------------------------------------------------- masks

def test_mask_is_exactly_the_assistant_tokens_and_their_end_of_turn(tok):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(os.path.dirname(tok))
    chat = ChatTokenizer(tok)
    assert chat.method == "prefixes"
    n = 0
    for where, messages in conversations():
        got = chat.encode(messages, where)
        if not any(m["role"] == "assistant" for m in messages):
            assert got is None
            continue
        ids, trained = expected(hf, messages)
        assert got[0].tolist() == ids, where
        assert got[1].tolist() == trained, where  # token by token
        n += sum(trained)
    assert n > 400


def test_generation_markers_give_the_same_mask(tok, tmp_path):
    gen = ChatTokenizer(tokenizer_dir(tok, tmp_path / "gen", GENERATION_TEMPLATE))
    plain = ChatTokenizer(tok)
    assert gen.method == "generation"
    for where, messages in conversations():
        a, b = gen.encode(messages, where), plain.encode(messages, where)
        assert (a is None and b is None) or (a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()), where


def test_templates_that_break_prefixes_and_tokenizers_without_one_are_refused(tok, tmp_path, capsys):
    counted = ("{{ messages|length }} messages\n{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
               "<|im_end|>\n{% endfor %}")
    bad = tokenizer_dir(tok, tmp_path / "counted", counted)
    with pytest.raises(BigtrainError) as e:
        write_chat_shards(bad, [CHAT], str(tmp_path / "a"), SEQ)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{CHAT}:1: chat template of {bad} does not render conversations as "
                                              "a sequence of prefixes")
    none = tokenizer_dir(tok, tmp_path / "none")
    with pytest.raises(SystemExit) as ex:
        main(["shards", "--format", "chat", "--tokenizer", none, "--input", CHAT, "--output", str(tmp_path / "b"),
              "--seq-len", str(SEQ)])
    assert ex.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bigtrain: error:")]
    assert err == [f"bigtrain: error: {none}: no chat template (no 'chat_template' in "
                   f"{tmp_path / 'none' / 'tokenizer_config.json'}, no {tmp_path / 'none' / 'chat_template.jinja'}): "
                   "--format chat renders conversations with the tokenizer's own template"]


# ---------------------------------------------------------------------------------------------- shards

@pytest.fixture(scope="module")
def chat_shards(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return build(tok, root / "drop"), root / "drop"


def test_shards_pack_whole_conversations_and_count(tok, chat_shards):
    m, out = chat_shards
    chat = ChatTokenizer(tok)
    want = [e for w, msgs in conversations() if (e := chat.encode(msgs, w)) is not None and len(e[0]) <= SEQ + 1]
    assert len(want) == 19
    assert {k: m[k] for k in ("token_flags", "format_kind", "dtype", "conversations", "documents", "dropped",
                              "no_assistant", "too_long", "too_long_policy", "dropped_tokens", "pad_id")} == dict(
        token_flags=True, format_kind="chat", dtype="uint32", conversations=21, documents=19, dropped=2,
        no_assistant=1, too_long=1, too_long_policy="drop", dropped_tokens=0, pad_id=2)
    assert m["trained_tokens"] == sum(int(t.sum()) for _, t in want)
    r = rows(out)
    assert r.shape == (m["samples"], SEQ + 1) and m["tokens"] == r.size
    assert m["padding_tokens"] == r.size - sum(len(i) for i, _ in want)
    assert max(s["max_token_id"] for s in m["shards"]) == int(words.unpack(r)[0].max()) < m["vocab_size"]
    docs = documents(r)
    convs = [d for d in docs if d[0][0] != m["pad_id"]]  # every conversation starts with <|im_start|>
    assert [(i.tolist(), t.tolist()) for i, t in want] == convs  # whole, in order, with their masks
    for ids, trained in (d for d in docs if d[0][0] == m["pad_id"]):
        assert set(ids) == {m["pad_id"]} and not any(trained)
    starts = words.unpack(r)[2]
    assert starts[:, 0].all() and starts.sum() == len(docs)  # no document crosses a sample boundary


def test_shards_are_deterministic_and_too_long_can_be_truncated(tok, chat_shards, tmp_path):
    m, out = chat_shards
    again = build(tok, tmp_path / "again")
    names = sorted(os.listdir(out))
    assert again == m and filecmp.cmpfiles(out, tmp_path / "again", names, shallow=False)[0] == names
    t = build(tok, tmp_path / "truncate", "--too-long", "truncate")
    assert (t["documents"], t["dropped"], t["too_long"], t["too_long_policy"]) == (20, 1, 1, "truncate")
    chat = ChatTokenizer(tok)
    where, long = conversations()[11]
    ids, trained = chat.encode(long, where)
    assert len(ids) > SEQ + 1
    assert (ids[:SEQ + 1].tolist(), trained[:SEQ + 1].tolist()) in documents(rows(tmp_path / "truncate"))


def test_loader_reads_chat_shards_with_their_masks(tok, chat_shards):
    from bigtrain.config.schema import Config, DataSource
    from bigtrain.data import build_train_source
    m, out = chat_shards
    c = Config()
    c.data.sources, c.data.lanes, c.data.tokenizer = [DataSource(path=str(out), weight=1.0)], 1, tok
    c.model.seq_length, c.model.vocab_size, c.train.global_batch_size = SEQ, m["vocab_size"], m["samples"]
    src = build_train_source(c, 0, 1)
    try:
        epoch = src.next_batch().numpy()  # one lane, a global batch of every sample: one epoch
    finally:
        src.close()
    written = rows(out)
    order = lambda a: a[np.lexsort(a.T[::-1])]
    assert (order(epoch) == order(written)).all()
    for a, b in zip(words.unpack(order(epoch))[:3], words.unpack(order(written))[:3]):
        assert (a == b).all()


# ---------------------------------------------------------------------------------------------- data show

def test_data_show_marks_untrained_spans_and_documents(tok, tmp_path, capsys):
    small = tmp_path / "two.jsonl"
    with open(CHAT) as f:
        small.write_text("".join(f.readlines()[:2]))  # 46 + 59 tokens: one sample of 128 with 23 padding
    main(["shards", "--format", "chat", "--tokenizer", tok, "--input", str(small), "--output", str(tmp_path / "s"),
          "--seq-len", str(SEQ)])
    capsys.readouterr()
    main(["data", "show", str(tmp_path / "s"), "--tokenizer", tok, "--json"])
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert got == [{"sample": 0, "spans": [
        {"text": system + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
         "trained": False, "doc_start": True},
        {"text": "The capital of France is Paris.<|im_end|>", "trained": True},
        {"text": "\n", "trained": False},
        {"text": "<|im_start|>system\nYou are a terse assistant. Answer in one sentence.<|im_end|>\n<|im_start|>user\n"
                 "Why is the sky blue?<|im_end|>\n<|im_start|>assistant\n", "trained": False, "doc_start": True},
        {"text": "Air molecules scatter short blue wavelengths of sunlight much more than long red ones, so blue light "
                 "reaches your eyes from every direction.<|im_end|>", "trained": True},
        {"text": "\n", "trained": False},
        {"text": EOT * 23, "trained": False, "doc_start": True}]}]
    shutil.copy(tok, tmp_path)  # the manifest's tokenizer beside the shard directory: no --tokenizer needed
    main(["data", "show", str(tmp_path / "s")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("legend: plain = trained, [[...]] = not trained") and "⟂" in lines[0]
    assert lines[1] == "── sample 0: 128 tokens, 34 trained"
    assert lines[2] == "⟂[[<|im_start|>system" and lines[-1] == f"]]⟂[[{EOT}×23]]"
    assert "]]The capital of France is Paris.<|im_end|>[[" in lines


def test_data_show_on_plain_shards_and_tokenizer_lookup(tok, tmp_path, capsys):
    from bigtrain.data import write_shards
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("One small document.", "A second one here.",
                                                                      "And a third document, a little longer.")))
    write_shards(tok, [str(text)], str(tmp_path / "plain"), 15, workers=1)
    capsys.readouterr()
    main(["data", "show", str(tmp_path / "plain"), "--tokenizer", tok, "--json", "--samples", "5"])
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(got) == 1 and all(s["trained"] for s in got[0]["spans"])
    assert [(s["text"], "doc_start" in s) for s in got[0]["spans"]] == [
        ("One small document.<|im_end|>", False), ("A second one here.<|im_end|>", True),
        ("And a third document,", True)]  # 16 tokens; the rest of the third document is in no whole sample
    with pytest.raises(BigtrainError, match=r"no tokenizer to decode with: pass --tokenizer \(the manifest names "
                                            r"'tokenizer.json', not found in"):
        show(str(tmp_path / "plain"))
    (tmp_path / "tokenizer.json").write_text(open(tok).read() + "\n")  # the same tokenizer, another file
    with pytest.raises(BigtrainError, match="differs from the tokenizer"):
        show(str(tmp_path / "plain"))
