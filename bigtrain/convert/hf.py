"""Hugging Face Llama <-> bigtrain checkpoints, in one process on the CPU, one tensor at a time.

to-hf:   any bigtrain checkpoint (any TP/PP/DP/ZeRO layout: the checkpoint format is layout-free) -> an HF
         Llama directory: config.json, generation_config.json, safetensors shards (+ index when sharded),
         and the tokenizer as files `transformers.AutoTokenizer` loads.
from-hf: an HF Llama-architecture directory (safetensors, PyTorch weights loaded with weights_only=True,
         or a GGUF file dequantised by transformers) -> a bigtrain checkpoint that
         `bigtrain train ... checkpoint.load=OUT` starts from on any layout.

Name map (megatron-core GPT <-> HF Llama), per layer i:
    decoder.layers.i.input_layernorm.weight            model.layers.i.input_layernorm.weight
    decoder.layers.i.self_attention.linear_qkv.weight  q_proj, k_proj, v_proj (megatron interleaves per KV group:
                                                       [q heads of group g; k_g; v_g] for g in groups)
    decoder.layers.i.self_attention.linear_proj.weight o_proj
    decoder.layers.i.pre_mlp_layernorm.weight          post_attention_layernorm
    decoder.layers.i.mlp.linear_fc1.weight             [gate_proj; up_proj]
    decoder.layers.i.mlp.linear_fc2.weight             down_proj
and embedding.word_embeddings.weight / model.embed_tokens.weight, decoder.final_layernorm.weight /
model.norm.weight, output_layer.weight / lm_head.weight. RoPE needs no permutation: megatron's
non-interleaved rotary embedding is HF's rotate_half. bigtrain pads the vocabulary (model.vocab_pad_multiple);
the padded rows are dropped on export and zero-filled on import.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import fsync_dir, write_json
from ..checkpoint.store import FORMAT, Reader, resolve
from ..config import Config, ConfigError, ModelConfig, ffn_size, kv_heads, padded_vocab
from ..config.load import from_dict
from ..errors import BigtrainError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_BYTES = 2 * 2**30


class ConversionError(BigtrainError):
    """A model or checkpoint the converter cannot map."""


# --- the name map -------------------------------------------------------------------------------------------

def layer_map(i: int) -> list[tuple[str, str]]:
    """(HF name, bigtrain name) pairs of layer i that map one to one."""
    h, b = f"model.layers.{i}.", f"decoder.layers.{i}."
    return [(h + "input_layernorm.weight", b + "input_layernorm.weight"),
            (h + "self_attn.o_proj.weight", b + "self_attention.linear_proj.weight"),
            (h + "post_attention_layernorm.weight", b + "pre_mlp_layernorm.weight"),
            (h + "mlp.down_proj.weight", b + "mlp.linear_fc2.weight")]


def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hd = kv_heads(m), m.hidden_size // m.num_attention_heads
    per = m.num_attention_heads // groups
    w = qkv.view(groups, per + 2, hd, -1)
    return (w[:, :per].reshape(groups * per * hd, -1), w[:, per].reshape(groups * hd, -1),
            w[:, per + 1].reshape(groups * hd, -1))


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    groups, hd = kv_heads(m), m.hidden_size // m.num_attention_heads
    per = m.num_attention_heads // groups
    h = q.shape[-1]
    return torch.cat([q.view(groups, per, hd, h), k.view(groups, 1, hd, h), v.view(groups, 1, hd, h)], 1).reshape(-1, h)


# --- HF config <-> bigtrain model config ------------------------------------------------------------------

MAPPED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
          "tie_word_embeddings", "max_position_embeddings", "head_dim", "hidden_act", "attention_bias", "mlp_bias",
          "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "attention_dropout"}
METADATA = {"_name_or_path", "architectures", "model_type", "transformers_version", "use_cache",
            "initializer_range", "id2label", "label2id", "return_dict", "output_attentions",
            "output_hidden_states", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder"}


def model_from_hf(hf: dict, where: str) -> tuple[ModelConfig, dict]:
    """bigtrain's model config for an HF Llama config, and what else to keep (token ids, dtype, ...)."""
    def refuse(what):
        raise ConversionError(f"{where}: {what}; bigtrain converts the Llama architecture (LlamaForCausalLM: "
                              "RMSNorm, SwiGLU (silu), RoPE with rope_type 'default', grouped-query attention, no "
                              "biases, head_dim = hidden_size / num_attention_heads, tied or untied embeddings)")

    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
               if k not in hf]
    if missing:
        refuse(f"config lacks {', '.join(missing)}")
    if hf.get("model_type") != "llama" or (hf.get("architectures") or ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        refuse(f"model_type {hf.get('model_type')!r} / architectures {hf.get('architectures')} is not Llama")
    from transformers import LlamaConfig
    defaults = LlamaConfig().to_dict()
    for key, value in hf.items():
        metadata = key in METADATA or key.startswith("_") or key.endswith("_token_id")
        if key not in MAPPED and not metadata and value != defaults.get(key, object()):
            refuse(f"config field {key}={value!r} has no mapping in bigtrain (mapped fields: {', '.join(sorted(MAPPED))})")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if scaling or rope.get("rope_type", "default") != "default":
        refuse(f"rope scaling {scaling or rope!r} is not supported (only rope_type 'default')")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, want) != want:
            refuse(f"config field {key}={hf[key]!r} (expected {want!r})")
    if hf.get("attention_dropout", 0.0):
        refuse(f"config field attention_dropout={hf['attention_dropout']} (expected 0.0)")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        refuse(f"head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads = {hf['hidden_size'] // heads}")
    m = ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                    num_attention_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                    ffn_hidden_size=hf["intermediate_size"], seq_length=min(hf.get("max_position_embeddings", 2048), 2048),
                    rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                    norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    keep = {k: v for k, v in hf.items() if k.endswith("_token_id")}
    keep["max_position_embeddings"] = hf.get("max_position_embeddings")
    keep["torch_dtype"] = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").removeprefix("torch.")
    return m, keep


def hf_config(m: ModelConfig, extra: dict, dtype: str):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=ffn_size(m),
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads, num_key_value_heads=kv_heads(m),
        head_dim=m.hidden_size // m.num_attention_heads, hidden_act="silu", rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=m.tie_embeddings, max_position_embeddings=extra.get("max_position_embeddings") or m.seq_length,
        bos_token_id=extra.get("bos_token_id"), eos_token_id=extra.get("eos_token_id"),
        pad_token_id=extra.get("pad_token_id"), architectures=["LlamaForCausalLM"], dtype=dtype)


# --- writing an output directory atomically -----------------------------------------------------------------

class _Output:
    """Writes into OUT.partial, renamed to OUT at the end; nothing is left in OUT when anything fails."""

    def __init__(self, out: str):
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise ConversionError(f"output {out} already exists and is not empty")
        self.out, self.tmp = out.rstrip("/"), out.rstrip("/") + ".partial"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        fsync_dir(self.tmp)
        if os.path.isdir(self.out):
            os.rmdir(self.out)  # an empty directory given as OUT
        os.replace(self.tmp, self.out)
        return False


class _ShardedWriter:
    """Collects tensors and writes them as safetensors files of at most `limit` bytes."""

    def __init__(self, output: _Output, name: str, limit: int, metadata: dict | None = None):
        self.output, self.name, self.limit, self.metadata = output, name, limit, metadata
        self.files: list[dict[str, torch.Tensor]] = []
        self.current: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.where: dict[str, int] = {}
        self.sizes: dict[str, int] = {}

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.current and self.size + nbytes > self.limit:
            self._flush()
        self.current[key] = t.contiguous()
        self.where[key] = len(self.files)
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        self.files.append(list(self.current))
        save_file(self.current, self.output.path(f"{self.name}-{len(self.files):05d}.tmp"), metadata=self.metadata)
        self.current, self.size = {}, 0

    def close(self, single_name: str) -> dict[str, str]:
        """Rename the parts to their final names; returns {tensor key: file name}."""
        if self.current:
            self._flush()
        n = len(self.files)
        names = [single_name] if n == 1 else [f"{self.name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, final in enumerate(names):
            os.replace(self.output.path(f"{self.name}-{i + 1:05d}.tmp"), self.output.path(final))
            self.sizes[final] = os.path.getsize(self.output.path(final))
        return {k: names[i] for k, i in self.where.items()}


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, mininterval=0.5)


# --- to-hf --------------------------------------------------------------------------------------------------

def _run_config(meta: dict, path: str) -> Config:
    try:
        return from_dict(Config, meta["config"], "")
    except (KeyError, ConfigError) as e:
        raise ConversionError(f"{path}: its meta.json holds no usable bigtrain config ({e})") from None


def to_hf(src: str, out: str, tokenizer: str | None = None, dtype: str | None = None,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Export a bigtrain checkpoint (or a run directory's newest one) as an HF Llama directory."""
    path = resolve(src)
    reader = Reader(path)
    cfg = _run_config(reader.meta, path)
    m = cfg.model
    extra = reader.meta.get("hf", {})
    dtype = dtype or extra.get("torch_dtype") or ("bfloat16" if cfg.train.precision == "bf16" else "float32")
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    tok_path = tokenizer if tokenizer is not None else cfg.data.tokenizer
    tok = _load_tokenizer(tok_path) if tok_path else None
    if tok is not None:
        if tok.vocab_size > m.vocab_size:
            raise ConversionError(f"tokenizer {tok_path} has {tok.vocab_size} tokens, the model only {m.vocab_size}")
        extra = {**extra, "bos_token_id": extra.get("bos_token_id", tok.bos_id), "eos_token_id": extra.get("eos_token_id", tok.eos_id)}
    torch_dtype = DTYPES[dtype]

    def get(name):
        return reader.read("model", name).to(torch_dtype)

    names = [("model.embed_tokens.weight", None)] + [(None, i) for i in range(m.num_layers)] + [("model.norm.weight", None)]
    total = 3 + 7 * m.num_layers
    with _Output(out) as output:
        writer = _ShardedWriter(output, "model", max_shard_bytes, metadata={"format": "pt"})
        with _progress(total, f"to-hf {os.path.basename(path)}") as bar:
            writer.add("model.embed_tokens.weight", get("embedding.word_embeddings.weight")[: m.vocab_size])
            bar.update(1)
            for i in range(m.num_layers):
                for hf_name, bt_name in layer_map(i):
                    writer.add(hf_name, get(bt_name))
                q, k, v = split_qkv(get(f"decoder.layers.{i}.self_attention.linear_qkv.weight"), m)
                for proj, t in zip("qkv", (q, k, v)):
                    writer.add(f"model.layers.{i}.self_attn.{proj}_proj.weight", t.clone())
                gate, up = get(f"decoder.layers.{i}.mlp.linear_fc1.weight").chunk(2)
                writer.add(f"model.layers.{i}.mlp.gate_proj.weight", gate.clone())
                writer.add(f"model.layers.{i}.mlp.up_proj.weight", up.clone())
                bar.update(7)
            writer.add("model.norm.weight", get("decoder.final_layernorm.weight"))
            if not m.tie_embeddings:
                writer.add("lm_head.weight", get("output_layer.weight")[: m.vocab_size])
            bar.update(2)
        weight_map = writer.close("model.safetensors")
        if len(writer.sizes) > 1:
            write_json(output.path("model.safetensors.index.json"),
                       {"metadata": {"total_size": writer.total}, "weight_map": dict(sorted(weight_map.items()))})
        config = hf_config(m, extra, dtype)
        config.save_pretrained(output.tmp)
        from transformers import GenerationConfig
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id, do_sample=False).save_pretrained(output.tmp)
        if tok is not None:
            _export_tokenizer(tok_path, tok, output.tmp, m.seq_length)
    reader.close()
    print(f"wrote {out}: {m.num_layers} layers, vocab {m.vocab_size}, {dtype}, {len(writer.sizes)} weight file(s)",
          file=sys.stderr)
    return out


def _load_tokenizer(path: str):
    from ..data.tokenizer import load_tokenizer
    return load_tokenizer(path)


def _export_tokenizer(path: str, tok, out: str, max_length: int) -> None:
    """Tokenizer files for `transformers.AutoTokenizer`. A sentencepiece model becomes a Llama tokenizer
    (converted once to tokenizer.json, so loading it needs no sentencepiece); a tokenizer.json is copied."""
    from transformers import AutoTokenizer
    if path.endswith(".json"):
        shutil.copy(path, os.path.join(out, "tokenizer.json"))
        beside = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.exists(beside):
            shutil.copy(beside, os.path.join(out, "tokenizer_config.json"))
        else:
            def piece(i):
                return tok._hf.id_to_token(i) if i is not None else None
            write_json(os.path.join(out, "tokenizer_config.json"), dict(
                tokenizer_class="PreTrainedTokenizerFast", bos_token=piece(tok.bos_id), eos_token=piece(tok.eos_id),
                model_max_length=max_length))
        return
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=path)

    def piece(i):
        return sp.id_to_piece(i) if i is not None and i >= 0 else None
    staging = out + ".tokenizer"
    os.makedirs(staging)
    try:
        shutil.copy(path, os.path.join(staging, "tokenizer.model"))
        write_json(os.path.join(staging, "tokenizer_config.json"), dict(
            tokenizer_class="LlamaTokenizer", bos_token=piece(tok.bos_id), eos_token=piece(tok.eos_id),
            unk_token=piece(sp.unk_id()), add_bos_token=False, add_eos_token=False, legacy=True,
            model_max_length=max_length))
        AutoTokenizer.from_pretrained(staging).save_pretrained(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- from-hf ------------------------------------------------------------------------------------------------

def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read it ({e.strerror}; {what})") from None
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def _hf_tensors(src: str, gguf_file: str | None):
    """(HF config dict, {name: callable returning the tensor}) for safetensors, .bin or GGUF weights."""
    if gguf_file:
        from transformers import AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            hint = "; pip install 'bigtrain[gguf]'" if "accelerate" in first or "gguf" in first.lower() else ""
            raise ConversionError(f"{os.path.join(src, gguf_file)}: transformers could not read it as a GGUF model "
                                  f"({type(e).__name__}: {first}{hint})") from None
        hf = model.config.to_dict()
        hf.pop("quantization_config", None)
        state = model.state_dict()
        return hf, {k: (lambda k=k: state[k]) for k in state}
    hf = _read_json(os.path.join(src, "config.json"), "expected a Hugging Face model directory, or --gguf-file")
    index = os.path.join(src, "model.safetensors.index.json")
    files = (sorted(set(_read_json(index, "a safetensors index")["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"] if os.path.exists(os.path.join(src, "model.safetensors")) else [])
    getters = {}
    if files:
        for name in files:
            handle = safe_open(os.path.join(src, name), framework="pt")
            for k in handle.keys():
                getters[k] = (lambda h=handle, k=k: h.get_tensor(k))
        return hf, getters
    bins = sorted(f for f in os.listdir(src) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if not bins:
        raise ConversionError(f"{src}: no model.safetensors(.index.json) or pytorch_model*.bin weights")
    for name in bins:  # weights_only: never unpickle anything but tensors
        state = torch.load(os.path.join(src, name), map_location="cpu", weights_only=True, mmap=True)
        for k in state:
            getters[k] = (lambda s=state, k=k: s[k])
    return hf, getters


def from_hf(src: str, out: str, gguf_file: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Import an HF Llama model as a bigtrain checkpoint (weights only: step 0, no optimizer state)."""
    hf, tensors = _hf_tensors(src, gguf_file)
    m, extra = model_from_hf(hf, os.path.join(src, gguf_file or "config.json"))
    cfg = Config(model=m)
    vocab = padded_vocab(m)

    def take(name):
        if name not in tensors:
            raise ConversionError(f"{src}: weight {name} is missing")
        return tensors[name]().to(torch.float32)

    def padded(t):
        return torch.cat([t, t.new_zeros(vocab - t.shape[0], t.shape[1])]) if vocab > t.shape[0] else t

    expected = {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if not m.tie_embeddings else set())
    for i in range(m.num_layers):
        expected |= {h for h, _ in layer_map(i)} | {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"} | \
                    {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up")}
    unknown = sorted(set(tensors) - expected - {"lm_head.weight"} - {k for k in tensors if k.endswith("rotary_emb.inv_freq")})
    if unknown:
        raise ConversionError(f"{src}: weights with no mapping in bigtrain's Llama: {', '.join(unknown[:5])}"
                              + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))

    with _Output(out) as output:
        writer = _ShardedWriter(output, "rank", max_shard_bytes)
        pieces, shapes = [], {}

        def put(name, t):
            writer.add(f"model/{name}/0", t)
            shapes[name] = list(t.shape)
            pieces.append(dict(kind="model", name=name, key=f"model/{name}/0", offsets=[0] * t.ndim, shape=list(t.shape)))

        with _progress(3 + 7 * m.num_layers, f"from-hf {os.path.basename(src.rstrip('/'))}") as bar:
            put("embedding.word_embeddings.weight", padded(take("model.embed_tokens.weight")))
            for i in range(m.num_layers):
                for hf_name, bt_name in layer_map(i):
                    put(bt_name, take(hf_name))
                p = f"model.layers.{i}."
                put(f"decoder.layers.{i}.self_attention.linear_qkv.weight",
                    merge_qkv(*(take(p + f"self_attn.{x}_proj.weight") for x in "qkv"), m))
                put(f"decoder.layers.{i}.mlp.linear_fc1.weight",
                    torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
                bar.update(7)
            put("decoder.final_layernorm.weight", take("model.norm.weight"))
            if not m.tie_embeddings:
                put("output_layer.weight", padded(take("lm_head.weight")))
            bar.update(3)
        files = writer.close("rank-00000.safetensors")
        for e in pieces:
            e["file"] = files[e["key"]]
        write_json(output.path("meta.json"), dict(
            format=FORMAT, step=0, reason="from-hf", time=time.time(), layout={"source": "huggingface"},
            optimizer_step=None, data=None, config=dataclasses.asdict(cfg), hf=extra,
            files=writer.sizes, pieces=pieces, tensors=shapes))
        with open(output.path("model.yaml"), "w") as f:
            import yaml
            yaml.safe_dump({"model": dataclasses.asdict(m)}, f, sort_keys=False)
    print(f"wrote {out}: {m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}; train from it with "
          f"`bigtrain train CONFIG checkpoint.load={out}` and the model section of {out}/model.yaml", file=sys.stderr)
    return out
