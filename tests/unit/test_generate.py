"""`bigtrain generate` and the in-loop samples (`train.sample_prompts`) on a tiny trained run: token choice, the
KV cache against re-encoding the prefix, prompts from files, the command's output, and training left bitwise
unchanged by the samples. (Multi-rank layouts: tests/dist/test_generate_layouts.py; an imported SmolLM2:
tests/unit/test_convert.py.)"""
import json
import os
import subprocess
import sys

import helpers
import pytest
import torch

from bigtrain.config import load_config
from bigtrain.errors import BigtrainError
from bigtrain.eval.decode import pick


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A tiny run trained 4 steps (one process)."""
    from bigtrain.train import train
    d = str(tmp_path_factory.mktemp("gen") / "run")
    train(load_config(None, helpers.tiny(data, d, "train.steps=4")))
    return d


def test_pick_greedy_nucleus_and_real_vocabulary_only():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 9.0])  # id 4 is a padded row: never a token
    assert pick(logits, 4) == 1
    assert pick(logits, 4, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0)) == 1
    gen = torch.Generator().manual_seed(0)
    draws = [pick(logits, 4, temperature=1.0, top_p=0.85, generator=gen) for _ in range(400)]
    # softmax over ids 0..3: 0.085, 0.631, 0.232, 0.052 -> the nucleus reaching 0.85 is {1, 2} (1: 73 %)
    assert set(draws) == {1, 2} and 200 < draws.count(1) < 340
    again = torch.Generator().manual_seed(0)
    assert [pick(logits, 4, temperature=1.0, top_p=0.85, generator=again) for _ in range(400)] == draws
    hot = [pick(logits, 4, temperature=100.0, generator=gen) for _ in range(400)]
    assert set(hot) == {0, 1, 2, 3}


def test_read_prompts(tmp_path):
    from bigtrain.eval.generate import read_prompts
    (tmp_path / "p.txt").write_text("first\n\nsecond line\\nwith a newline\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "id": 2}\n')
    assert read_prompts(["x"], str(tmp_path / "p.txt")) == ["x", "first", "second line\nwith a newline"]
    assert read_prompts([], str(tmp_path / "p.jsonl")) == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(BigtrainError, match='bad.jsonl:1: expected an object with a string field "prompt"'):
        read_prompts([], str(tmp_path / "bad.jsonl"))
    with pytest.raises(BigtrainError, match="no prompt"):
        read_prompts([], None)


def test_kv_cache_decoding_equals_reencoding_the_prefix(run):
    """The KV-cache path (megatron's static inference context, bottom-right causal decode) gives the logits of a
    full forward over the whole prefix at every new position, so greedy and seeded sampling choose the same
    tokens either way; generation stops at model.seq_length."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from bigtrain.data import load_tokenizer
    from bigtrain.eval.load import load_for_inference
    from bigtrain.eval.decode import generate, last_logits
    loaded = load_for_inference(run)
    model, cfg, tok = loaded.model, loaded.cfg, load_tokenizer(loaded.tokenizer)
    prompts = ["import json\n", "def loads(s, *, cls=None", ""]
    kw = dict(max_new_tokens=8)
    plain = generate(model, cfg, tok, prompts, kv_cache=False, **kw)
    sampled_plain = generate(model, cfg, tok, prompts, kv_cache=False, temperature=1.0, top_p=0.9, seed=3, **kw)
    cached = generate(model, cfg, tok, prompts, **kw)
    sampled_cached = generate(model, cfg, tok, prompts, temperature=1.0, top_p=0.9, seed=3, **kw)
    assert [r["tokens"] for r in cached] == [r["tokens"] for r in plain]
    assert [r["tokens"] for r in sampled_cached] == [r["tokens"] for r in sampled_plain]
    assert all(len(r["tokens"]) == 8 for r in sampled_cached)
    assert all(t < tok.vocab_size for r in sampled_cached for t in r["tokens"])
    assert sampled_cached[0]["completion"] == tok.decode(tok.encode(prompts[0]) + sampled_cached[0]["tokens"])[
        len(prompts[0]):]

    # logits, position by position: cached decode vs a full forward of the whole sequence
    seq = tok.encode(prompts[1]) + sampled_cached[1]["tokens"]
    p = len(tok.encode(prompts[1]))
    context = StaticInferenceContext(1, len(seq))
    steps = [last_logits(model, torch.tensor([seq[:p]]), -1, context)[0]]
    context.sequence_len_offset += p
    for i in range(p, len(seq)):
        steps.append(last_logits(model, torch.tensor([[seq[i]]]), -1, context)[0])
        context.sequence_len_offset += 1
    for i, got in zip(range(p - 1, len(seq)), steps):
        want = last_logits(model, torch.tensor([seq[: i + 1]]), i)[0]
        assert (got - want).abs().max().item() <= 1e-5, i

    # at most model.seq_length tokens in all
    long = tok.encode(open(os.path.join(helpers.STDLIB, "json", "__init__.py")).read())[:30]
    out = generate(model, cfg, tok, [tok.decode(long)], max_new_tokens=10)[0]
    assert len(tok.encode(tok.decode(long))) + len(out["tokens"]) == cfg.model.seq_length


def test_generate_command_prints_one_json_object_per_prompt(run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "class "}) + "\n" + json.dumps({"prompt": "import os\n"}) + "\n")
    cmd = [sys.executable, "-m", "bigtrain", "generate", run, "--prompt", "def f(x):", "--prompt-file", str(prompts),
           "--temperature", "0.7", "--top-p", "0.9", "--seed", "5", "--max-new-tokens", "6"]
    proc = subprocess.run(cmd, env=helpers.clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()  # stdout holds the results and nothing else
    results = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in results] == ["def f(x):", "class ", "import os\n"]
    for r in results:
        assert set(r) == {"prompt", "completion", "tokens"} and 1 <= len(r["tokens"]) <= 6
        assert isinstance(r["completion"], str)
    bad = subprocess.run([*cmd[:5], "--prompt", "x", "--top-p", "0"], env=helpers.clean_env(), capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("--top-p 0.0: expected 0 < top-p <= 1")


def test_in_loop_samples_leave_training_bitwise_unchanged(data, tmp_path):
    """train.sample_prompts: at each evaluation the training model continues each prompt greedily; the samples
    reach events.jsonl and TensorBoard, and every training loss, gradient norm and validation loss is bitwise the
    same as without them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bigtrain.train import train
    common = ["train.steps=4", f"data.validation={data['val']}", "train.eval_interval=2", "train.eval_batches=1",
              "model.hidden_dropout=0.1"]  # dropout: training draws random numbers, which sampling must not shift
    plain, sampled = str(tmp_path / "plain"), str(tmp_path / "sampled")
    train(load_config(None, helpers.tiny(data, plain, *common)))
    train(load_config(None, helpers.tiny(data, sampled, *common, 'train.sample_prompts=["import json", "def "]',
                                         "train.sample_max_new_tokens=3")))
    a, b = helpers.read_metrics(plain), helpers.read_metrics(sampled)
    for key in ("loss", "grad_norm", "val_loss"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    with open(os.path.join(sampled, "events.jsonl")) as f:
        samples = [e for e in map(json.loads, f) if e["event"] == "sample"]
    assert [(e["step"], e["prompt"]) for e in samples] == [(2, "import json"), (2, "def "), (4, "import json"),
                                                           (4, "def ")]
    assert all(isinstance(e["completion"], str) for e in samples)
    acc = EventAccumulator(os.path.join(sampled, "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert {"samples/0/text_summary", "samples/1/text_summary"} <= set(acc.Tags()["tensors"])
    text = acc.Tensors("samples/1/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "def " + samples[-1]["completion"] in text
