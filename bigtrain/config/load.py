"""YAML files + dotted `key=value` overrides -> a validated `Config`.

Every mistake is reported before any work starts, as one line naming the key: unknown keys with the
closest valid one, wrong types with the expected type, values outside a fixed set with the choices.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import math
import typing
from typing import Any, Literal, get_args, get_origin

import yaml

from ..errors import BigtrainError
from .schema import Config


class ConfigError(BigtrainError, ValueError):
    """A config mistake; its message is one line naming the key and what was expected."""


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> Config:
    """Read a YAML config (or start from `base`, a config as `to_dict` gives it, or from defaults), apply
    `key=value` overrides, validate."""
    data: dict = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
            what = " ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
            raise ConfigError(f"{where}: not valid YAML: {' '.join(what.split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    cfg = from_dict(Config, data, "")
    check(cfg)
    return cfg


class _Override:
    """A command-line value: read as YAML (numbers, booleans, lists), except where the key is a string,
    which takes the text as typed (run.dir=010 stays '010', not 8)."""

    def __init__(self, raw: str):
        self.raw = raw
        try:
            self.value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            self.value = raw


def parse_override(item: str) -> tuple[str, _Override]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. train.steps=20)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    return key, _Override(raw)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(options)})"


def from_dict(cls, data: Any, prefix: str):
    """Build dataclass `cls` from a mapping, checking every key and type."""
    where = prefix.rstrip(".") or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            options = [f"{prefix}{k}" for k in fields]
            raise ConfigError(f"unknown config key '{full}'{_suggest(full, options)}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(tp, value, key):
    if isinstance(value, _Override):
        value = value.raw if tp is str else value.value
    origin = get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': expected one of {'|'.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        (inner,) = get_args(tp)
        if dataclasses.is_dataclass(inner) and {"name", "path"} <= {f.name for f in dataclasses.fields(inner)}:
            value = _named_paths(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and "path" in {f.name for f in dataclasses.fields(tp)}:
            value = {"path": value}  # shorthand: a source given by its path alone
        return from_dict(tp, value, f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-2' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
            raise bad
        return str(value)
    raise bad


def _named_paths(value):
    """Shorthands for a list of named paths (data.sources, data.validation): one path, or a {name: path} mapping."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, dict):
        if "path" in value:
            return [value]
        if all(isinstance(v, str) for v in value.values()):
            return [{"name": k, "path": v} for k, v in value.items()]
    return value


def check(cfg: Config) -> None:
    """Checks that need no knowledge of the machine (world-size checks happen at start-up)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    for key, v in [("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers),
                   ("model.num_attention_heads", m.num_attention_heads), ("model.seq_length", m.seq_length),
                   ("model.vocab_size", m.vocab_size), ("train.micro_batch_size", t.micro_batch_size),
                   ("train.global_batch_size", t.global_batch_size), ("parallel.tensor", p.tensor),
                   ("parallel.pipeline", p.pipeline), ("train.log_interval", t.log_interval)]:
        need(v >= 1, f"config key '{key}': expected a positive integer, got {v}")
    need(t.steps >= 0, f"config key 'train.steps': expected >= 0, got {t.steps}")
    need(m.hidden_size % m.num_attention_heads == 0,
         f"config key 'model.hidden_size': {m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
    kv = m.num_kv_heads or m.num_attention_heads
    need(m.num_kv_heads >= 0 and m.num_attention_heads % max(kv, 1) == 0,
         f"config key 'model.num_kv_heads': {m.num_kv_heads} must divide model.num_attention_heads={m.num_attention_heads}")
    need(0 <= p.zero_stage <= 3, f"config key 'parallel.zero_stage': expected 0, 1, 2 or 3, got {p.zero_stage}")
    need(t.global_batch_size % t.micro_batch_size == 0,
         f"config key 'train.global_batch_size': {t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}")
    need(m.num_attention_heads % p.tensor == 0 and kv % p.tensor == 0,
         f"config key 'parallel.tensor': {p.tensor} must divide the query heads ({m.num_attention_heads}) and KV heads ({kv})")
    need(m.num_layers % p.pipeline == 0,
         f"config key 'parallel.pipeline': {p.pipeline} must divide model.num_layers={m.num_layers}")
    for key in ("partition_activations", "offload_activations"):
        need(not getattr(p, key) or p.activation_checkpointing == "full",
             f"config key 'parallel.{key}': needs parallel.activation_checkpointing=full "
             f"(got {p.activation_checkpointing})")
        need(not getattr(p, key) or (m.hidden_dropout == 0 and m.attention_dropout == 0),
             f"config key 'parallel.{key}': DeepSpeed's recompute does not replay megatron's dropout RNG: needs "
             "model.hidden_dropout=0 and model.attention_dropout=0")
    need(not p.partition_activations or not p.sequence_parallel,
         "config key 'parallel.partition_activations': the layer inputs are already split under "
         "parallel.sequence_parallel (use one or the other)")
    need(not p.sequence_parallel or p.tensor > 1,
         "config key 'parallel.sequence_parallel': needs parallel.tensor > 1")
    need(not p.sequence_parallel or m.seq_length % p.tensor == 0,
         f"config key 'parallel.sequence_parallel': model.seq_length={m.seq_length} must be a multiple of parallel.tensor={p.tensor}")
    for key, v in [("model.vocab_pad_multiple", m.vocab_pad_multiple), ("model.ffn_multiple_of", m.ffn_multiple_of),
                   ("train.eval_batches", t.eval_batches), ("checkpoint.keep", cfg.checkpoint.keep)]:
        need(v >= 1, f"config key '{key}': expected a positive integer, got {v}")
    for key, v in [("train.warmup_steps", t.warmup_steps), ("train.decay_steps", t.decay_steps),
                   ("train.eval_interval", t.eval_interval), ("checkpoint.interval", cfg.checkpoint.interval),
                   ("data.lanes", cfg.data.lanes), ("data.num_workers", cfg.data.num_workers),
                   ("model.num_kv_heads", m.num_kv_heads), ("model.ffn_hidden_size", m.ffn_hidden_size),
                   ("launch.max_requeues", cfg.launch.max_requeues), ("train.grad_clip", t.grad_clip),
                   ("train.weight_decay", t.weight_decay), ("train.min_lr", t.min_lr)]:
        need(v >= 0, f"config key '{key}': expected >= 0, got {v}")
    for key, v in [("train.lr", t.lr), ("train.peak_tflops", t.peak_tflops), ("train.adam_eps", t.adam_eps),
                   ("model.init_std", m.init_std), ("model.rope_theta", m.rope_theta), ("model.norm_eps", m.norm_eps),
                   ("launch.signal_seconds", cfg.launch.signal_seconds), *[
                       (f"watchdog.{k}", getattr(cfg.watchdog, k)) for k in (
                           "startup_timeout", "first_step_timeout", "min_step_timeout", "checkpoint_timeout",
                           "evaluation_timeout", "collective_timeout")]]:
        need(v > 0, f"config key '{key}': expected > 0, got {v}")
    for key, v in [("train.beta1", t.beta1), ("train.beta2", t.beta2), ("model.hidden_dropout", m.hidden_dropout),
                   ("model.attention_dropout", m.attention_dropout)]:
        need(0 <= v < 1, f"config key '{key}': expected a value in [0, 1), got {v}")
    need(t.min_lr <= t.lr, f"config key 'train.min_lr': {t.min_lr} is above train.lr={t.lr}")
    need(0 <= cfg.data.max_skip_fraction <= 1,
         f"config key 'data.max_skip_fraction': expected a fraction in [0, 1], got {cfg.data.max_skip_fraction}")
    for i, s in enumerate(cfg.data.sources):
        need(s.path, f"config key 'data.sources[{i}].path': expected a path, got nothing")
        need(s.weight > 0, f"config key 'data.sources[{i}].weight': expected > 0, got {s.weight}")
        need(math.isfinite(s.loss_weight) and s.loss_weight >= 0,
             f"config key 'data.sources[{i}].loss_weight': expected a finite number >= 0, got {s.loss_weight}")
    held_out = cfg.data.validation_sets()
    names = [name for name, _ in held_out]
    for i, (name, path) in enumerate(held_out):
        need(path, f"config key 'data.validation[{i}].path': expected a path, got nothing")
        need(names.count(name) == 1, f"config key 'data.validation[{i}]': the name '{name}' is used twice (name the "
                                     "sets: data.validation={name: path, ...})")
        need("/" not in name and name.strip() == name and name,
             f"config key 'data.validation[{i}].name': {name!r} is not usable as a metric name (no '/', no blanks)")
    _check_data_reading(cfg.data, need)
    g = cfg.guard
    for key, v in [("guard.max_consecutive_skips", g.max_consecutive_skips), ("guard.spike_window", g.spike_window),
                   ("guard.rewind_window", g.rewind_window), ("checkpoint.max_failures", cfg.checkpoint.max_failures)]:
        need(v >= 1, f"config key '{key}': expected a positive integer, got {v}")
    for key, v in [("guard.spike_sigmas", g.spike_sigmas), ("guard.spike_warmup", g.spike_warmup),
                   ("guard.rewind_after", g.rewind_after), ("guard.max_rewinds", g.max_rewinds),
                   ("guard.rewind_margin", g.rewind_margin)]:
        need(v >= 0, f"config key '{key}': expected >= 0, got {v}")
    need(g.spike_warmup <= g.spike_window, f"config key 'guard.spike_warmup': {g.spike_warmup} is more than "
                                           f"guard.spike_window={g.spike_window}")
    need(cfg.watchdog.step_timeout >= 0,
         f"config key 'watchdog.step_timeout': expected >= 0 (0 = derived from step times), got {cfg.watchdog.step_timeout}")
    need(cfg.watchdog.step_timeout_factor >= 1,
         f"config key 'watchdog.step_timeout_factor': expected >= 1, got {cfg.watchdog.step_timeout_factor}")
    d = cfg.distill
    need(0 <= d.alpha <= 1, f"config key 'distill.alpha': expected a value in [0, 1], got {d.alpha}")
    need(d.temperature > 0, f"config key 'distill.temperature': expected > 0, got {d.temperature}")
    need(not d.teacher or p.pipeline == 1,
         "unsupported: distill.teacher with parallel.pipeline > 1 (the teacher runs beside the student in its "
         "tensor-parallel layout only); use tensor and data parallelism")
    for i, f in enumerate(cfg.debug.faults):
        need(f.batch >= 0 and f.rank >= 0, f"config key 'debug.faults[{i}]': batch and rank must be >= 0, "
                                           f"got batch={f.batch} rank={f.rank}")


def _check_data_reading(d, need) -> None:
    """Remote reads' timeouts and retries; data.prepare writes local paths only."""
    from ..data.remote import scheme
    for key, v in [("data.stall_timeout", d.stall_timeout), ("data.connect_timeout", d.connect_timeout)]:
        need(v > 0, f"config key '{key}': expected > 0 seconds, got {v}")
    for key, v in [("data.retries", d.retries), ("data.retry_backoff", d.retry_backoff)]:
        need(v >= 0, f"config key '{key}': expected >= 0, got {v}")
    if not d.prepare:
        return
    for key, path in [("data.tokenizer", d.tokenizer), *[(f"data.sources[{i}].path", s.path) for i, s in
                      enumerate(d.sources)], *[(f"data.validation[{i}].path", p) for i, (_, p) in
                                               enumerate(d.validation_sets())]]:
        need(not scheme(path), f"config key 'data.prepare': {key} is {path}, not a local path: data.prepare="
                               f"{d.prepare} writes its tokenizer and shards to local paths (write shards with `bigtrain "
                               "shards`, upload them, and drop data.prepare)")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def field_docs(cls) -> dict[str, str]:
    """The docstrings under each field of dataclass `cls` (read from its source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def describe(cfg, prefix: str = "") -> list[str]:
    """`key = value  # doc` lines for the whole tree (what `bigtrain config` prints)."""
    lines = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        doc = " ".join(docs.get(f.name, "").split())
        if dataclasses.is_dataclass(value):
            lines.append(f"# {key}: {doc}")
            lines += describe(value, key + ".")
        else:
            shown = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value] \
                if isinstance(value, list) else value
            lines.append(f"{key} = {shown!r}    # {doc}")
    return lines


def dump(cfg: Config, path: str) -> None:
    from ..atomic import atomic_write
    with atomic_write(path) as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
