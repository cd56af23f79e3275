"""Hugging Face Llama <-> bigtrain checkpoints, in one process on the CPU, one tensor at a time.

to-hf:   any bigtrain checkpoint (any TP/PP/DP/ZeRO layout: the checkpoint format is layout-free) -> an HF
         Llama directory: config.json, generation_config.json, safetensors shards (+ index when sharded),
         and the tokenizer as files `transformers.AutoTokenizer` loads.
from-hf: an HF Llama-architecture directory (safetensors, PyTorch weights loaded with weights_only=True,
         or a GGUF file dequantised by transformers) -> a bigtrain checkpoint that
         `bigtrain train ... checkpoint.load=OUT` starts from on any layout.

The name map is names.py (one declarative table, read in both directions); the checkpoint side is written by
bigtrain.checkpoint (FullCheckpointWriter) and read by its Reader; every output directory is published whole
(bigtrain.atomic.atomic_dir): a failed conversion leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open

from ..atomic import atomic_dir, write_json
from ..checkpoint.store import (FullCheckpointWriter, Reader, SafetensorsFiles, checkpoint_config, checkpoint_tokenizer,
                               resolve)
from ..config import Config, ModelConfig, ffn_size, kv_heads
from ..errors import BigtrainError
from .names import rules

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_BYTES = 2 * 2**30


class ConversionError(BigtrainError):
    """A model or checkpoint the converter cannot map."""


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


def _check_transformers() -> None:
    import transformers
    if int(transformers.__version__.split(".")[0]) != 5:
        raise ConversionError(f"transformers {transformers.__version__} is installed; bigtrain reads and writes "
                              "transformers 5's Llama config (rope_parameters, dtype): pip install 'transformers>=5,<6'")


def _check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConversionError(f"output {out} already exists and is not empty")


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, mininterval=0.5)


# --- to-hf --------------------------------------------------------------------------------------------------

def to_hf(src: str, out: str, tokenizer: str | None = None, dtype: str | None = None,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Export a bigtrain checkpoint (or a run directory's newest one) as an HF Llama directory."""
    _check_transformers()
    path = resolve(src)
    reader = Reader(path)
    cfg = checkpoint_config(reader.meta, path)
    m = cfg.model
    extra = reader.meta.get("hf", {})
    dtype = dtype or extra.get("torch_dtype") or ("bfloat16" if cfg.train.precision == "bf16" else "float32")
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    tok_path = tokenizer if tokenizer is not None else checkpoint_tokenizer(cfg, path)
    tok = _load_tokenizer(tok_path) if tok_path else None
    if tok is not None:
        if tok.vocab_size > m.vocab_size:
            raise ConversionError(f"tokenizer {tok_path} has {tok.vocab_size} tokens, the model only {m.vocab_size}")
        extra = {**extra, "bos_token_id": extra.get("bos_token_id", tok.bos_id), "eos_token_id": extra.get("eos_token_id", tok.eos_id)}
    torch_dtype = DTYPES[dtype]

    table = rules(m)
    _check_out(out)
    with atomic_dir(out) as tmp:
        writer = SafetensorsFiles(tmp, max_shard_bytes, metadata={"format": "pt"})
        with _progress(len(table), f"to-hf {os.path.basename(path)}") as bar:
            for rule in table:
                full = reader.read("model", rule.ours).to(torch_dtype)
                for name, t in zip(rule.theirs, rule.how.to_hf(full, m)):
                    writer.add(name, t)
                bar.update(1)
        weight_map = writer.close(lambda n: ["model.safetensors"] if n == 1 else
                                  [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        if len(writer.sizes) > 1:
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": writer.total}, "weight_map": dict(sorted(weight_map.items()))})
        config = hf_config(m, extra, dtype)
        config.save_pretrained(tmp)
        from transformers import GenerationConfig
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id, do_sample=False).save_pretrained(tmp)
        if tok is not None:
            _export_tokenizer(tok_path, tok, tmp, m.seq_length)
    reader.close()
    print(f"wrote {out}: {m.num_layers} layers, vocab {m.vocab_size}, {dtype}, {len(writer.sizes)} weight file(s)",
          file=sys.stderr)
    return out


def _load_tokenizer(path: str):
    from ..data.tokenizer import load_tokenizer
    return load_tokenizer(path)


# what travels with a model's tokenizer.json / tokenizer.model: from an HF directory into an import, from an
# import (or a run's tokenizer directory) into an export
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def _copy_beside(path: str, out: str, names, replace: bool = True) -> list[str]:
    """Copy the files `names` that lie beside `path` into `out`; returns those copied."""
    done = []
    for name in names:
        src, dst = os.path.join(os.path.dirname(path), name), os.path.join(out, name)
        if os.path.isfile(src) and (replace or not os.path.exists(dst)):
            shutil.copy(src, dst)
            done.append(name)
    return done


def _export_tokenizer(path: str, tok, out: str, max_length: int) -> None:
    """Tokenizer files for `transformers.AutoTokenizer`. A tokenizer.json is copied, with the tokenizer_config.json,
    special_tokens_map.json and chat template beside it (an import carries its model's); a sentencepiece model
    becomes a Llama tokenizer (converted once to tokenizer.json, so loading it needs no sentencepiece), configured
    by the tokenizer_config.json beside it when it is an import's tokenizer.model."""
    from transformers import AutoTokenizer
    if path.endswith(".json"):
        shutil.copy(path, os.path.join(out, "tokenizer.json"))
        beside = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.exists(beside):
            _copy_beside(path, out, TOKENIZER_EXTRAS)
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
        # an import's own tokenizer.model: its tokenizer_config.json (chat template...) goes along
        carried = _copy_beside(path, staging, TOKENIZER_EXTRAS) if os.path.basename(path) == "tokenizer.model" else []
        if "tokenizer_config.json" not in carried:
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


def _carry_tokenizer(src: str, gguf_file: str | None, out: str) -> str:
    """Put the model's tokenizer into the import `out`: the tokenizer files of the HF directory `src`, or, for a
    GGUF file without them, the tokenizer transformers reads from the GGUF. Returns the file `data.tokenizer`
    names (tokenizer.json, else tokenizer.model), or "" when there is none."""
    copied = _copy_beside(os.path.join(src, "config.json"), out, TOKENIZER_FILES + TOKENIZER_EXTRAS)
    if not any(name in copied for name in TOKENIZER_FILES) and gguf_file:
        from transformers import AutoTokenizer
        try:
            AutoTokenizer.from_pretrained(src, gguf_file=gguf_file).save_pretrained(out)
        except Exception as e:
            print(f"from-hf: no tokenizer in {os.path.join(src, gguf_file)} ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
    return next((name for name in TOKENIZER_FILES if os.path.exists(os.path.join(out, name))), "")


def from_hf(src: str, out: str, gguf_file: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Import an HF Llama model as a bigtrain checkpoint (weights only: step 0, no optimizer state)."""
    _check_transformers()
    hf, tensors = _hf_tensors(src, gguf_file)
    m, extra = model_from_hf(hf, os.path.join(src, gguf_file or "config.json"))
    cfg = Config(model=m)
    table = rules(m)

    def take(name):
        if name not in tensors:
            raise ConversionError(f"{src}: weight {name} is missing")
        return tensors[name]().to(torch.float32)

    expected = {n for rule in table for n in rule.theirs}
    unknown = sorted(set(tensors) - expected - {"lm_head.weight"} - {k for k in tensors if k.endswith("rotary_emb.inv_freq")})
    if unknown:
        raise ConversionError(f"{src}: weights with no mapping in bigtrain's Llama: {', '.join(unknown[:5])}"
                              + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))

    _check_out(out)
    with atomic_dir(out) as tmp:
        writer = FullCheckpointWriter(tmp, max_shard_bytes)
        with _progress(len(table), f"from-hf {os.path.basename(src.rstrip('/'))}") as bar:
            for rule in table:
                writer.add(rule.ours, rule.how.from_hf([take(n) for n in rule.theirs], m))
                bar.update(1)
        carried = _carry_tokenizer(src, gguf_file, tmp)
        if carried:  # the path it will have once published
            cfg.data = dataclasses.replace(cfg.data, tokenizer=os.path.join(os.path.abspath(out), carried))
        writer.close(reason="from-hf", layout={"source": "huggingface"}, config=dataclasses.asdict(cfg), hf=extra)
        with open(os.path.join(tmp, "model.yaml"), "w") as f:
            import yaml
            section = {"model": dataclasses.asdict(m)}
            if carried:
                section["data"] = {"tokenizer": cfg.data.tokenizer}
            yaml.safe_dump(section, f, sort_keys=False)
    print(f"wrote {out}: {m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}"
          f"{', its tokenizer' if carried else ', no tokenizer (none found)'}; train from it with "
          f"`bigtrain train CONFIG checkpoint.load={out}` and the model section of {out}/model.yaml", file=sys.stderr)
    return out
