"""data.validation's forms and `bigtrain eval --data`'s NAME=PATH parsing (pure functions, no processes)."""
import math

import pytest

from bigtrain.config import ConfigError, load_config
from bigtrain.errors import BigtrainError
from bigtrain.eval.perplexity import parse_sets
from bigtrain.eval.perplexity import metrics_of


@pytest.mark.parametrize("override, sets", [
    ("data.validation=data/stdlib/val", [("val", "data/stdlib/val")]),
    ("data.validation=[a/x, {name: code, path: b/y}]", [("x", "a/x"), ("code", "b/y")]),
    ("data.validation={web: a/b, code: c/d}", [("web", "a/b"), ("code", "c/d")]),
    ("data.validation={path: a/b, name: w}", [("w", "a/b")]),
    ("data.validation=", []),
])
def test_validation_forms(override, sets):
    assert load_config(None, [override]).data.validation_sets() == sets


@pytest.mark.parametrize("override, message", [
    ("data.validation=[a/val, b/val]", "the name 'val' is used twice"),
    ("data.validation={w/x: a}", "not usable as a metric name"),
    ("data.validation=3", "expected a list"),
    ("data.validation=[{name: a}]", "data.validation[0].path"),
])
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=r"data\.validation") as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_a_plain_string_assigned_in_code_is_one_set():
    cfg = load_config(None, [])
    cfg.data.validation = "x/held"
    assert cfg.data.validation_sets() == [("held", "x/held")]


def test_parse_sets():
    assert parse_sets(["web=/d/val", "/d/code/", "t=/a=b"]) == [("web", "/d/val"), ("code", "/d/code/"),
                                                                 ("t", "/a=b")]
    for bad, message in ((["a=/x", "a=/y"], "used twice"), (["a="], "no path")):
        with pytest.raises(BigtrainError, match=message):
            parse_sets(bad)


def test_metrics_of():
    out = metrics_of({"a": 2.0, "b": 1000.0})
    assert out["val_loss"] == 2.0 and math.isclose(out["val/a/ppl"], math.exp(2.0)) and out["val/b/ppl"] == math.inf


def test_eval_refuses_a_batch_count_below_one_before_loading():
    from bigtrain.eval.perplexity import evaluate_checkpoint
    with pytest.raises(BigtrainError, match="--batches 0"):
        evaluate_checkpoint("/nonexistent", ["a=/x"], batches=0)
