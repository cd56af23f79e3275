import pytest

from bigtrain.config import load_config
from bigtrain.train.lr import lr_at


def test_warmup_then_cosine_to_min_lr():
    cfg = load_config(None, ["train.steps=110", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"])
    assert [round(lr_at(s, cfg), 6) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(109, cfg) == pytest.approx(0.1, abs=1e-3) and lr_at(10_000, cfg) == pytest.approx(0.1)
    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=0", "train.decay_steps=10", "train.lr=1.0",
                             "train.min_lr=0"])
    assert lr_at(0, cfg) == pytest.approx(1.0) and lr_at(5, cfg) == pytest.approx(0.5) and lr_at(50, cfg) == 0.0
