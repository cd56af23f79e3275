"""The guards' pure parts: the spike detector's statistics, the skipped-batches record, the non-finite verdict."""
import json
import math

import pytest

from bigtrain.config import load_config
from bigtrain.errors import BigtrainError
from bigtrain.train.guard import NonFiniteGuard, SkippedBatches, SpikeDetector


class Trainer:
    """What the guards call on the trainer, recorded."""

    def __init__(self):
        self.rewinds, self.failures, self.anomalies, self.events = [], [], [], []
        self.metrics = self

    def request_rewind(self, before_step, reason):
        self.rewinds.append(before_step)

    def fail(self, message, unwell_since=None):
        self.failures.append((message, unwell_since))

    def note_anomaly(self, kind):
        self.anomalies.append(kind)

    def event(self, kind, step, **fields):
        self.events.append((kind, step))


def record(step, loss, applied=True, batch=None, grad_norm=1.0, reason=""):
    return dict(step=step, batch=step - 1 if batch is None else batch, loss=loss, grad_norm=grad_norm,
                applied=applied, skip_reason=reason)


def test_spike_detector_flags_outliers_after_warmup_and_asks_for_a_rewind():
    g = load_config(None, ["guard.spike_warmup=5", "guard.rewind_after=2", "guard.rewind_window=10"]).guard
    d, t = SpikeDetector(g), Trainer()
    for s in range(1, 9):
        d.after_step(t, record(s, 5.0 - 0.05 * s))  # a falling loss is never a spike
    assert t.events == []
    d.after_step(t, record(9, 9.0))
    assert t.events == [("spike", 9)] and t.anomalies == ["spike"] and not t.rewinds
    d.after_step(t, record(10, 4.5))             # normal again
    d.after_step(t, record(11, 4.4, applied=False, reason="non-finite loss nan"))
    assert t.rewinds == [9]                      # two anomalies within 10 batches: back before the first
    state = json.loads(json.dumps(d.state_dict()))
    d2 = SpikeDetector(g)
    d2.load_state_dict(state)
    assert list(d2.window) == list(d.window) and len(d2.window) == 9  # the spike itself stays out of the window


def test_spike_needs_more_than_noise():
    """With no spread at all, sigma is taken as 1% of the mean: 6 sigma = 18% of 3.0 here."""
    g = load_config(None, ["guard.spike_warmup=3"]).guard
    for last, spike in ((3.15, False), (3.2, True)):
        d, t = SpikeDetector(g), Trainer()
        for s in range(1, 6):
            d.after_step(t, record(s, 3.0))
        d.after_step(t, record(6, last))
        assert (t.events == [("spike", 6)]) == spike, (last, t.events)


def test_nonfinite_guard_vetoes_counts_and_stops():
    g = load_config(None, ["guard.max_consecutive_skips=3"]).guard
    guard, t = NonFiniteGuard(g), Trainer()
    assert guard.before_optimizer_step(t, 2.0, 1.0) is True
    assert guard.before_optimizer_step(t, math.nan, math.inf) == "non-finite loss nan and gradient norm inf"
    for b in range(3):
        guard.after_step(t, record(7, math.nan, applied=False, batch=10 + b, reason="non-finite loss nan"))
    assert len(t.failures) == 1 and t.failures[0][1] == 7 and "3 steps in a row were skipped" in t.failures[0][0]
    stop = NonFiniteGuard(load_config(None, ["guard.nonfinite=stop"]).guard)
    stop.after_step(t, record(2, math.nan, applied=False, reason="non-finite loss nan"))
    assert "guard.nonfinite=stop" in t.failures[-1][0]


def test_skipped_batches_record(tmp_path):
    s = SkippedBatches(str(tmp_path))
    assert 5 not in s
    s.add(5, 9, {"to_step": 4})
    s.add(20, 21, {"to_step": 18})
    s.save()
    again = SkippedBatches(str(tmp_path))
    assert [b for b in range(25) if b in again] == [5, 6, 7, 8, 20] and again.count() == 5
    assert len(again.rewinds) == 2
    (tmp_path / "skipped_batches.json").write_text("{not json")
    with pytest.raises(BigtrainError, match="skipped_batches.json: unreadable"):
        SkippedBatches(str(tmp_path))
