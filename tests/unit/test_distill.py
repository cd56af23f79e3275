"""Distillation in the loop (one process, real megatron model in a real DeepSpeed engine): teacher = student gives
KD 0, alpha = 0 trains exactly like plain cross-entropy, the teacher stays frozen and out of checkpoints, a resume
is exact, and mismatched teachers are refused in one line."""
import json
import math
import os

import pytest
import torch

import helpers
from bigtrain.config import load_config
from bigtrain.train import Callback, train

TEACHER = ["model.hidden_size=96", "model.num_layers=2", "model.num_attention_heads=4", "model.num_kv_heads=2"]


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A teacher of another width and depth than the student, trained a few steps on the same tokenizer."""
    run = str(tmp_path_factory.mktemp("teacher") / "run")
    helpers.bigtrain("train", os.devnull, *helpers.tiny(data, run, *TEACHER, "train.steps=6"))
    return run


def _run(data, run, *extra):
    return train(load_config(None, helpers.tiny(data, run, *extra))).history


def test_alpha_zero_trains_exactly_like_cross_entropy(data, teacher, tmp_path):
    plain = _run(data, str(tmp_path / "plain"), "train.steps=4")
    distilled = _run(data, str(tmp_path / "kd"), "train.steps=4", f"distill.teacher={teacher}", "distill.alpha=0")
    assert [r["loss"] for r in distilled] == pytest.approx([r["loss"] for r in plain], rel=1e-6, abs=0)
    assert [r["grad_norm"] for r in distilled] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-6, abs=0)
    assert all(r["kd"] > 0.01 for r in distilled)  # a different model: the KD term is there, weighted 0
    assert [r["ce"] for r in distilled] == pytest.approx([r["loss"] for r in distilled], rel=1e-6)


def test_teacher_equal_to_student_gives_zero_kd(data, teacher, tmp_path):
    """The student starts from the teacher's own weights: at the first step the two distributions are equal."""
    history = _run(data, str(tmp_path / "same"), *TEACHER, "train.steps=2", f"distill.teacher={teacher}",
                   f"checkpoint.load={teacher}", "checkpoint.load_optimizer=false", "distill.alpha=0.5")
    assert abs(history[0]["kd"]) < 1e-6, history[0]
    assert history[1]["kd"] > history[0]["kd"]  # after an update they differ
    assert math.isclose(history[0]["loss"], 0.5 * history[0]["ce"] + 0.5 * history[0]["kd"], rel_tol=1e-6)


class _Frozen(Callback):
    def on_start(self, trainer):
        self.teacher = trainer.objective.teacher
        self.before = {k: v.detach().clone() for k, v in self.teacher.named_parameters()}
        self.grads = []

    def after_step(self, trainer, record):
        self.grads += [p.grad for p in self.teacher.parameters() if p.grad is not None]

    def on_close(self, trainer, error):
        self.after = {k: v.detach().clone() for k, v in self.teacher.named_parameters()}


def test_teacher_frozen_and_out_of_checkpoints_and_resume_is_exact(data, teacher, tmp_path):
    kd = ["train.steps=6", f"distill.teacher={teacher}", "distill.alpha=0.7", "distill.temperature=2",
          "train.decay_steps=4"]
    frozen = _Frozen()
    whole = train(load_config(None, helpers.tiny(data, str(tmp_path / "whole"), *kd)), [frozen]).history
    assert frozen.before.keys() == frozen.after.keys() and not frozen.grads
    assert all(torch.equal(frozen.before[k], frozen.after[k]) for k in frozen.before)
    assert all(r["kd"] > 0 and r["ce"] > 0 for r in whole)

    # no teacher tensor in the checkpoint: the same tensors as a run without distillation; the teacher recorded
    plain = str(tmp_path / "plain")
    _run(data, plain, "train.steps=1")
    metas = [json.load(open(os.path.join(r, "checkpoints", s, "meta.json")))
             for r, s in ((str(tmp_path / "whole"), "step-00000006"), (plain, "step-00000001"))]
    assert sorted(metas[0]["tensors"]) == sorted(metas[1]["tensors"])
    recorded = metas[0]["trainer"]["callbacks"]["Distillation"]["teacher"]
    assert recorded["path"] == os.path.join(teacher, "checkpoints", "step-00000006") and recorded["step"] == 6

    # stop after 3 steps, resume to 6: bit for bit the uninterrupted run
    half = str(tmp_path / "half")
    first = _run(data, half, *kd[1:], "train.steps=3")
    rest = _run(data, half, *kd)
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in whole]
    assert [r["kd"] for r in first + rest] == [r["kd"] for r in whole]


@pytest.mark.parametrize("overrides, message", [
    (["model.vocab_size=1024"], "must share the tokenizer and padded vocabulary"),
    (["parallel.pipeline=2"], "distill.teacher with parallel.pipeline > 1"),
    (["distill.alpha=1.5"], "distill.alpha"),
])
def test_mismatched_teachers_are_refused_in_one_line(data, teacher, tmp_path, overrides, message):
    proc = helpers.bigtrain("train", os.devnull, *helpers.tiny(data, str(tmp_path / "r"), f"distill.teacher={teacher}",
                                                              *overrides), check=False)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("bigtrain: error:")]
    assert proc.returncode != 0 and len(errors) == 1 and message in errors[0], proc.stdout[-3000:]
    if "vocab" in message:
        assert teacher in errors[0] and "512" in errors[0] and "1024" in errors[0]


def test_smollm2_teacher_beats_cross_entropy_on_held_out_text(smollm2_import, tmp_path):
    """A real teacher and real text: SmolLM2-135M (imported) distils into a small student with its tokenizer; after
    the same steps on the same shards, the distilled student's held-out loss is below the CE-only student's
    (tools/distill_smollm2.py runs the longer version whose curves the closing note quotes)."""
    import yaml

    from bigtrain.data import write_shards
    tokenizer = os.path.join(smollm2_import, "tokenizer.json")  # the import carries SmolLM2's tokenizer
    train_dir, held_out = str(tmp_path / "train"), str(tmp_path / "held-out")
    write_shards(tokenizer, [f"{helpers.STDLIB}/{m}/*.py" for m in ("email", "logging", "json")], train_dir, 64,
                 samples_per_member=16, shard_samples=256, workers=1)
    write_shards(tokenizer, [f"{helpers.STDLIB}/html/*.py"], held_out, 64, samples_per_member=16, shard_samples=256,
                 workers=1)
    with open(os.path.join(smollm2_import, "model.yaml")) as f:
        teacher = yaml.safe_load(f)["model"]
    steps = 10
    student = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_kv_heads=2",
               "model.tie_embeddings=true", "model.seq_length=64", f"model.vocab_size={teacher['vocab_size']}",
               f"model.vocab_pad_multiple={teacher['vocab_pad_multiple']}", "train.precision=fp32",
               "train.micro_batch_size=4", "train.global_batch_size=8", f"train.steps={steps}", "train.lr=3e-3",
               "train.min_lr=3e-4", "train.warmup_steps=2", f"train.eval_interval={steps}", "train.eval_batches=8",
               f"data.tokenizer={tokenizer}", f"data.sources=[{{path: {train_dir}}}]", "data.lanes=2",
               f"data.validation={{held-out: {held_out}}}"]
    held = {}
    for name, extra in (("ce", []), ("kd", [f"distill.teacher={smollm2_import}", "distill.alpha=0.5"])):
        run = str(tmp_path / name)
        helpers.bigtrain("train", os.devnull, f"run.dir={run}", *student, *extra)
        with open(os.path.join(run, "metrics.jsonl")) as f:
            held[name] = [json.loads(line) for line in f][-1]["val/held-out/loss"]
    assert held["kd"] < held["ce"] - 0.05, held
