"""Config: coercion of YAML and override values, one-line errors naming the key, documentation."""
import pytest

from bigtrain.config import Config, ConfigError, describe, load_config
from bigtrain.config.load import from_dict, parse_override


def test_defaults_load_and_describe_every_key():
    cfg = load_config()
    lines = describe(cfg)
    assert any(line.startswith("guard.nonfinite = 'skip'") for line in lines)
    assert all("#" in line for line in lines)  # every key carries its docstring


@pytest.mark.parametrize("item, key, value", [
    ("train.steps=20", "train.steps", 20), ("train.lr=1e-3", "train.lr", 1e-3), ("train.lr=3", "train.lr", 3.0),
    ("run.dir=010", "run.dir", "010"), ("model.tie_embeddings=true", "model.tie_embeddings", True),
    ("guard.spike_metrics=[loss, grad_norm]", "guard.spike_metrics", ["loss", "grad_norm"]),
])
def test_overrides_are_coerced_to_the_field_type(item, key, value):
    cfg = load_config(None, [item])
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("item, message", [
    ("train.stpes=3", "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
    ("train.steps=2.5", "config key 'train.steps': expected an integer, got 2.5"),
    ("train.steps=true", "config key 'train.steps': expected an integer, got True"),
    ("guard.nonfinite=ignore", "config key 'guard.nonfinite': expected one of skip|stop, got 'ignore'"),
    ("guard.spike_metrics=[loss, gnorm]", "config key 'guard.spike_metrics[1]': expected one of loss|grad_norm"),
    ("debug.faults=[{kind: nan_loss, batch: -1}]", "config key 'debug.faults[0]': batch and rank must be >= 0"),
    ("guard.spike_warmup=500", "guard.spike_warmup': 500 is more than guard.spike_window=100"),
    ("checkpoint.max_failures=0", "config key 'checkpoint.max_failures': expected a positive integer, got 0"),
    ("train", "override 'train': expected key=value"),
])
def test_mistakes_are_one_line_naming_the_key(item, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_path_alone_is_a_source():
    cfg = from_dict(Config, {"data": {"sources": ["/x", {"path": "/y", "weight": 2}]}}, "")
    assert [(s.path, s.weight) for s in cfg.data.sources] == [("/x", 1.0), ("/y", 2.0)]


def test_override_values_read_as_yaml_except_for_strings():
    key, value = parse_override("run.name=1.10")
    assert key == "run.name" and value.raw == "1.10" and value.value == 1.1
