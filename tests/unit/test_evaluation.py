"""Validation sets and `bigtrain eval`: each set's logged loss equals a direct computation over the same tokens,
evaluation leaves training bitwise untouched, and `bigtrain eval` reads shard directories and raw text alike."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import helpers

STEPS, EVAL_BATCHES, G = 4, 2, 8


def _records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def evaluated(data, tmp_path_factory):
    """A tiny run that evaluates two named sets every 2 steps, and the same run without evaluation."""
    root = tmp_path_factory.mktemp("evaluated")
    with_eval, without = str(root / "with"), str(root / "without")
    sets = f"data.validation={{html: {data['val']}, http: {data['train_b']}}}"
    helpers.bigtrain("train", os.devnull, *helpers.tiny(data, with_eval, sets, f"train.steps={STEPS}",
                                                        "train.eval_interval=2", f"train.eval_batches={EVAL_BATCHES}"))
    helpers.bigtrain("train", os.devnull, *helpers.tiny(data, without, f"train.steps={STEPS}"))
    return with_eval, without


def test_each_set_is_logged_and_equals_a_direct_computation(evaluated, data):
    run, _ = evaluated
    last = _records(run)[-1]
    assert last["step"] == STEPS
    for name in ("html", "http"):
        assert math.isclose(last[f"val/{name}/ppl"], math.exp(last[f"val/{name}/loss"]), rel_tol=1e-9)
    assert last["val_loss"] == last["val/html/loss"]
    assert abs(last["val/html/loss"] - last["val/http/loss"]) > 1e-3  # two sets, two different losses

    # the same tokens through the checkpoint's model, cross-entropy computed here
    from bigtrain.data import open_source
    from bigtrain.data.validation import ValidationSource
    from bigtrain.eval.load import load_for_inference
    from bigtrain.parallel.schedule import logits
    loaded = load_for_inference(run)
    assert loaded.meta["step"] == STEPS
    for name, path in (("html", data["val"]), ("http", data["train_b"])):
        valid = ValidationSource(open_source(path, name), seq_len=helpers.SEQ, vocab_size=helpers.VOCAB,
                                 global_batch=G)
        tokens = torch.cat(list(valid.batches(EVAL_BATCHES)))
        assert tokens.shape == (EVAL_BATCHES * G, helpers.SEQ + 1)
        out = logits(loaded.model, tokens[:, :-1], loaded.cfg)
        direct = F.cross_entropy(out.flatten(0, 1), tokens[:, 1:].flatten()).item()
        assert abs(direct - last[f"val/{name}/loss"]) <= 1e-5 * direct, (name, direct, last[f"val/{name}/loss"])


def test_evaluation_does_not_perturb_training(evaluated):
    with_eval, without = evaluated
    a, b = _records(with_eval), _records(without)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    assert sum("val/html/loss" in r for r in a) == STEPS // 2 and not any("val_loss" in r for r in b)


def test_tensorboard_has_a_curve_per_set(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(evaluated[0], "tensorboard"))
    acc.Reload()
    for tag in ("val/html/loss", "val/html/ppl", "val/http/loss", "val/http/ppl"):
        assert [e.step for e in acc.Scalars(tag)] == [2, 4], tag


def test_eval_cli_reads_shards_and_raw_text_alike(evaluated, data):
    run, _ = evaluated
    logged = _records(run)[-1]
    html_text = f"{helpers.STDLIB}/html/*.py"  # what data['val'] was built from, with the same tokenizer
    out = helpers.bigtrain("eval", run, "--data", f"html={data['val']}", "--data", f"text={html_text}",
                           "--data", f"http={data['train_b']}", "--batches", str(EVAL_BATCHES)).stdout
    result = json.loads(out.strip().splitlines()[-1])
    sets = result["sets"]
    assert result["step"] == STEPS and os.path.isdir(result["checkpoint"])
    assert abs(sets["html"]["loss"] - logged["val/html/loss"]) <= 1e-6 * logged["val/html/loss"]
    assert abs(sets["http"]["loss"] - logged["val/http/loss"]) <= 1e-6 * logged["val/http/loss"]
    assert sets["text"]["loss"] == sets["html"]["loss"]  # tokenized on the fly: the very same tokens
    assert sets["html"]["tokens"] == EVAL_BATCHES * G * helpers.SEQ
    assert math.isclose(sets["html"]["ppl"], math.exp(sets["html"]["loss"]))

    # without --data: the run's own validation sets, every whole batch of each
    whole = json.loads(helpers.bigtrain("eval", run).stdout.strip().splitlines()[-1])["sets"]
    assert set(whole) == {"html", "http"}
    manifest = json.load(open(os.path.join(data["val"], "manifest.json")))
    assert whole["html"]["batches"] == manifest["samples"] // G


@pytest.mark.parametrize("args, message", [  # (the other argument errors: tests/fast/test_validation_sets.py)
    (["--data", "a=/nonexistent/dir"], "/nonexistent/dir"),
])
def test_eval_cli_errors_are_one_line(evaluated, args, message):
    proc = helpers.bigtrain("eval", evaluated[0], *args, check=False)
    assert proc.returncode == 2, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("bigtrain: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stdout[-3000:]


def test_eval_of_a_run_without_checkpoint_is_one_line(tmp_path):
    proc = helpers.bigtrain("eval", str(tmp_path), check=False)
    assert proc.returncode == 2 and "not a checkpoint, run directory" in proc.stdout, proc.stdout[-2000:]
