"""The trainer from the outside: the quickstart config on real text, the command line's errors, what a run
directory holds, and the parts of the model that the multi-rank suite does not isolate."""
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import helpers
from bigtrain.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_tiny_yaml_trains_on_stdlib_text(tmp_path):
    """README quickstart: `bigtrain train configs/tiny.yaml train.steps=20 run.dir=R` from a fresh directory
    builds its corpus from the standard library, trains 20 steps, and the loss falls."""
    shutil.copytree(os.path.join(REPO, "configs"), tmp_path / "configs")
    proc = subprocess.run(["bigtrain", "train", "configs/tiny.yaml", "train.steps=20", "run.dir=R"], cwd=tmp_path,
                          env=helpers.clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    records = helpers.read_metrics(str(tmp_path / "R"))
    assert [r["step"] for r in records] == list(range(1, 21))
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "mem_gib"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("loss", "lr", "grad_norm", "tokens_per_s"))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert first > 8.5 and last < first - 2.0, (first, last)  # ln(8000) = 9.0 at the start
    assert "step 20/20 | loss" in proc.stdout


def test_misspelled_override_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", os.path.join(REPO, "configs/tiny.yaml"),
                           "parallel.tensr=2"], env=helpers.clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("bigtrain: error: unknown config key 'parallel.tensr' "
                                   "(did you mean 'parallel.tensor'?)")


@pytest.mark.parametrize("override, message", [
    ("train.steps=ten", "config key 'train.steps': expected an integer, got 'ten'"),
    ("train.precision=fp16", "config key 'train.precision': expected one of fp32|bf16, got 'fp16'"),
    ("parallel.activation_checkpointing=some", "expected one of none|selective|full"),
    ("model.hidden_size=100", "model.hidden_size': 100 is not divisible by model.num_attention_heads=8"),
    ("trian.steps=3", "unknown config key 'trian' (did you mean 'train'?)"),
    ("train.global_batch_size=12", "train.global_batch_size': 12 is not a multiple of train.micro_batch_size=8"),
    ("data.sources=[{path: x, weigth: 2}]", "unknown config key 'data.sources[0].weigth' (did you mean 'data.sources[0].weight'?)"),
    ("data.lanes=-1", "config key 'data.lanes': expected >= 0, got -1"),
    ("train.peak_tflops=0", "config key 'train.peak_tflops': expected > 0, got 0.0"),
    ("train.min_lr=1.0", "config key 'train.min_lr': 1.0 is above train.lr=0.003"),
    ("model.hidden_dropout=1.5", "config key 'model.hidden_dropout': expected a value in [0, 1), got 1.5"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(REPO, "configs/tiny.yaml"), [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_string_overrides_keep_their_text():
    cfg = load_config(None, ["run.dir=010", "run.name=1.10", "data.tokenizer=12:30", "train.steps=7"])
    assert (cfg.run.dir, cfg.run.name, cfg.data.tokenizer, cfg.train.steps) == ("010", "1.10", "12:30", 7)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.pipeline=2", "parallel.zero_stage=3"], 2, "zero_stage=3 with parallel.pipeline > 1"),
    (["parallel.pipeline=2", "parallel.zero_stage=2", "model.tie_embeddings=true"], 2, "tie_embeddings=true"),
    (["parallel.zero_stage=0", "train.precision=bf16"], 1, "zero_stage=0 with train.precision=bf16"),
    (["parallel.tensor=2"], 3, "does not divide the 3 ranks"),
    (["train.global_batch_size=16", "train.micro_batch_size=8"], 4, "multiple of train.micro_batch_size=8 x data-parallel size 4"),
])
def test_unsupported_layouts_are_refused(overrides, world, message):
    from bigtrain.parallel import check_layout
    cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        check_layout(cfg, world)


def test_unsupported_layout_exits_before_training_under_torchrun(data, tmp_path):
    proc = helpers.bigtrain("train", os.devnull, *helpers.tiny(data, str(tmp_path / "r"), "parallel.pipeline=2",
                                                              "parallel.zero_stage=3"), nproc=2, check=False)
    assert proc.returncode != 0
    assert "bigtrain: error: unsupported: parallel.zero_stage=3 with parallel.pipeline > 1" in proc.stdout
    assert not os.path.exists(tmp_path / "r" / "metrics.jsonl")


def test_run_directory_contents_and_tensorboard(data, tmp_path):
    """Under `torchrun --no-python bigtrain train`: metrics.jsonl per step, events, the resolved config, and
    TensorBoard scalars for loss, lr, grad norm, throughput, TFLOP/s, MFU and memory, plus validation."""
    run = str(tmp_path / "run")
    helpers.bigtrain("train", os.devnull, *helpers.tiny(data, run, f"data.validation={data['val']}",
                                                        "train.eval_interval=5", "train.eval_batches=2"), nproc=2)
    records = helpers.read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    cfg = load_config(os.path.join(run, "config.yaml"))
    assert cfg.model.hidden_size == 64 and cfg.run.dir == run
    events = [json.loads(line) for line in open(os.path.join(run, "events.jsonl"))]
    assert events[0]["event"] == "start" and events[0]["world"] == 2 and events[0]["launcher"] == "torchrun"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (tb,) = glob.glob(os.path.join(run, "tensorboard"))
    acc = EventAccumulator(tb)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops_per_device",
                "train/mfu", "train/mem_gib", "val/loss", "run/restarts"):
        assert tag in tags, tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert math.isfinite(acc.Scalars("val/loss")[0].value)


def test_lr_schedule_warmup_then_cosine():
    from bigtrain.train import lr_at
    cfg = load_config(None, ["train.steps=110", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"])
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(109, cfg) == pytest.approx(0.1, abs=1e-3) and lr_at(500, cfg) == pytest.approx(0.1)


@pytest.fixture
def model_parallel():
    from bigtrain.parallel import init_model_parallel, setup
    setup("gloo")
    init_model_parallel(1, 1, 1)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sdpa_attention_equals_megatron_reference_attention(kv_heads, model_parallel):
    """bigtrain's core attention (torch SDPA: flash/cuDNN on GPU) computes what megatron's unfused
    DotProductAttention computes, with grouped-query attention, values and gradients."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from bigtrain.model.gpt import SDPAttention, transformer_config
    cfg = load_config(None, ["train.precision=fp32", "model.hidden_size=64", "model.num_attention_heads=4",
                             f"model.num_kv_heads={kv_heads}"])
    tcfg = transformer_config(cfg)
    ours = SDPAttention(tcfg, 1, AttnMaskType.causal, "self")
    ref = DotProductAttention(tcfg, 1, AttnMaskType.causal, "self")
    s, b, d = 24, 3, 16
    q = torch.randn(s, b, 4, d, requires_grad=True)
    k = torch.randn(s, b, kv_heads, d, requires_grad=True)
    v = torch.randn(s, b, kv_heads, d, requires_grad=True)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
    out = ours(q, k, v, None)
    want = ref(q, k, v, mask)
    assert out.shape == want.shape == (s, b, 4 * d)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, w in zip(grads, want_grads):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


def test_model_is_built_with_sdpa_and_rmsnorm(model_parallel):
    from bigtrain.model import build_model
    from bigtrain.model.gpt import RMSNorm, SDPAttention
    model = build_model(load_config(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                                           "model.vocab_size=300"]))
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attention.core_attention, SDPAttention)
    assert isinstance(layer.input_layernorm, RMSNorm) and isinstance(model.decoder.final_layernorm, RMSNorm)
    assert model.embedding.word_embeddings.weight.shape == (384, 64)  # vocab padded to a multiple of 128
    assert layer.mlp.linear_fc1.weight.shape == (2 * 256, 64)          # SwiGLU: [gate; up], ffn = 256


def test_cpu_shims_only_without_gpu(monkeypatch):
    """The CPU shims are applied only when no GPU is present."""
    import bigtrain.parallel.cpu_shims as shims
    monkeypatch.setattr(shims, "_applied", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.Tensor.cuda
    shims.apply()
    assert torch.Tensor.cuda is before and shims._applied is False
