"""The guards on real multi-rank engines (every ZeRO stage, fp32 and bf16, DP2 / TP2 / PP2 / TP2xPP2): a NaN
loss on one rank and an inf in one gradient of another are skipped without changing anything; a very large lr
never leaves a non-finite checkpoint or prunes the good one; a loss spike rewinds the run, and the rewound run
never trains on the skipped batches, also after a restart."""
import hashlib
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from bigtrain.checkpoint import Reader, validate
from bigtrain.checkpoint import state as S
from bigtrain.config import load_config
from bigtrain.errors import BigtrainError
from bigtrain.parallel.distributed import on_rank0
from bigtrain.train import Callback, train
from helpers import tiny

FAULTS = "debug.faults=[{kind: nan_loss, batch: 1, rank: 1}, {kind: inf_grad, batch: 3, rank: 0}]"


class Snapshots(Callback):
    """Every parameter's fp32 master weights, AdamW moments and step, and the model's own copy, taken before each
    step and compared after each skipped one."""

    def __init__(self, faulted):
        self.faulted, self.skipped, self.lr = faulted, [], {}

    def _state(self, t):
        moments = S.optimizer_step(t.engine) is not None
        if moments:
            S.link_moments(t.engine)
        out = {"adam_step": S.optimizer_step(t.engine)}
        for m in t.ckpt.maps:  # collective over DP under ZeRO: every rank, same order
            for kind, v in S.shard_state(t.engine, m, moments)[0].items():
                out[m.global_name, kind] = v.detach().clone()
            out[m.global_name, "param"] = getattr(m.param, "ds_tensor", m.param).detach().clone()
        return out

    def before_step(self, t):
        if t.data.index // t.cfg.train.global_batch_size in self.faulted:  # the next batch is a faulted one
            self.before = self._state(t)

    def after_step(self, t, record):
        self.lr.setdefault(record["step"], set()).add(record["lr"])
        if record["applied"]:
            return
        after = self._state(t)
        assert after.keys() == self.before.keys()
        for k, v in self.before.items():
            assert (v == after[k]) if k == "adam_step" else torch.equal(v, after[k]), (record, k)
        self.skipped.append(record["batch"])


def _write_skips(run_dir, ranges):
    if dist.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "skipped_batches.json"), "w") as f:
            json.dump({"format": "bigtrain-skipped-batches", "ranges": ranges, "rewinds": []}, f)
    dist.barrier()


# every ZeRO stage in fp32 and in bf16 (ZeRO-0 refuses bf16), over DP2, TP2 and PP2 (and TP2 x PP2, TP2 x DP2)
LAYOUTS2 = [
    ["parallel.zero_stage=0"],
    ["parallel.zero_stage=1", "train.precision=bf16"],
    ["parallel.zero_stage=2", "train.precision=bf16"],
    ["parallel.zero_stage=3", "train.precision=bf16"],
    ["parallel.tensor=2", "parallel.zero_stage=2"],
    ["parallel.pipeline=2", "parallel.zero_stage=0", "model.tie_embeddings=true"],
    ["parallel.pipeline=2", "train.precision=bf16"],
]
LAYOUTS4 = [["parallel.tensor=2", "parallel.pipeline=2"], ["parallel.tensor=2", "parallel.zero_stage=3"]]


def _skip_is_a_no_op(layout, data, shared_dir, faults=FAULTS):
    """Faults at batches 1 and 3: both steps are skipped, nothing in the engine changes, the LR of the retried
    step is the same, and the run's losses are bitwise those of a run that never saw batches 1 and 3."""
    common = ["train.steps=5", "checkpoint.interval=2", *layout]
    snap = Snapshots(faulted=(1, 3))
    faulted = train(load_config(None, tiny(data, os.path.join(shared_dir, "faulted"), faults, *common)), [snap])
    assert snap.skipped == [1, 3]
    assert all(len(v) == 1 for v in snap.lr.values()), snap.lr  # a retried step keeps its learning rate
    assert [r["step"] for r in faulted.history] == [1, 2, 3, 4, 5]
    assert [r["batch"] for r in faulted.history] == [0, 2, 4, 5, 6]
    assert faulted.history[-1]["skipped_steps"] == 2
    clean_dir = os.path.join(shared_dir, "clean")
    _write_skips(clean_dir, [[1, 2], [3, 4]])
    clean = train(load_config(None, tiny(data, clean_dir, *common)))
    assert [r["loss"] for r in faulted.history] == [r["loss"] for r in clean.history]
    if dist.get_rank() == 0:
        root = os.path.join(shared_dir, "faulted", "checkpoints")
        for name in sorted(os.listdir(root)):
            if name.startswith("step-"):
                reader = Reader(os.path.join(root, name))
                for e in reader.meta["pieces"]:
                    assert torch.isfinite(reader.read(e["kind"], e["name"], e["offsets"], e["shape"])).all()
        events = [json.loads(line) for line in open(os.path.join(shared_dir, "faulted", "events.jsonl"))]
        skips = [e for e in events if e["event"] == "skipped_step"]
        assert [e["batch"] for e in skips] == [1, 3] and "loss nan" in skips[0]["reason"]
        assert "gradient norm inf" in skips[1]["reason"]
    dist.barrier()


@pytest.mark.world(2)
@pytest.mark.parametrize("layout", LAYOUTS2, ids=lambda c: "-".join(o.split(".", 1)[1].replace("=", "") for o in c))
def test_nonfinite_step_is_skipped_and_changes_nothing_2(layout, data, shared_dir):
    _skip_is_a_no_op(layout, data, shared_dir)


@pytest.mark.world(4)
@pytest.mark.parametrize("layout", LAYOUTS4, ids=lambda c: "-".join(o.split(".", 1)[1].replace("=", "") for o in c))
def test_nonfinite_step_is_skipped_and_changes_nothing_4(layout, data, shared_dir):
    # ranks 2 and 3 are the last pipeline stage: the NaN goes into rank 3's logits
    _skip_is_a_no_op(layout, data, shared_dir, FAULTS.replace("rank: 1", "rank: 3"))


@pytest.mark.world(2)
@pytest.mark.parametrize("layout", [["parallel.zero_stage=0"], ["parallel.zero_stage=2", "train.precision=bf16"]],
                         ids=["zero0-fp32", "zero2-bf16"])
def test_huge_lr_never_saves_garbage_nor_prunes_the_good_checkpoint(layout, data, shared_dir):
    """A good run, then the same run resumed with lr=1e6 and checkpoint.keep=2: it stops with one line, no
    checkpoint holds a non-finite value, the good one survives pruning, and a resume with a sane lr goes on."""
    common = ["checkpoint.interval=2", "checkpoint.keep=2", "guard.spike_warmup=2", "guard.rewind_margin=1",
              "guard.max_rewinds=1", *layout]
    train(load_config(None, tiny(data, shared_dir, "train.steps=4", *common)))
    with pytest.raises(BigtrainError) as e:
        train(load_config(None, tiny(data, shared_dir, "train.steps=40", "train.lr=1e6", "train.min_lr=0", *common)))
    msg = str(e.value)
    assert "\n" not in msg and "a resume continues from step-00000004, the newest healthy checkpoint" in msg, msg
    root = os.path.join(shared_dir, "checkpoints")
    if dist.get_rank() == 0:
        dirs = [os.path.join(root, n) for n in os.listdir(root) if n.startswith("step-")]
        dirs += [os.path.join(root, "unhealthy", n) for n in os.listdir(os.path.join(root, "unhealthy"))] \
            if os.path.isdir(os.path.join(root, "unhealthy")) else []
        for d in dirs:
            reader = Reader(d)
            for p in reader.meta["pieces"]:
                assert torch.isfinite(reader.read(p["kind"], p["name"], p["offsets"], p["shape"])).all(), (d, p)
        assert max(n for n in os.listdir(root) if n.startswith("step-")) == "step-00000004"
        assert open(os.path.join(root, "latest")).read().strip() == "step-00000004"
        assert validate(os.path.join(root, "step-00000004"))["health"]["healthy"]
    dist.barrier()
    again = train(load_config(None, tiny(data, shared_dir, "train.steps=7", *common)))
    assert [r["step"] for r in again.history] == [5, 6, 7]
    assert all(r["loss"] < 6.5 for r in again.history), again.history


class Batches(Callback):
    """A digest of this rank's share of every batch the run trains on (updates applied)."""

    def __init__(self):
        self.seen = {}

    def after_step(self, t, record):
        if record["applied"]:
            self.seen[t.batch_index] = hashlib.sha256(t.batch.cpu().numpy().tobytes()).hexdigest()


@pytest.mark.world(2)
def test_spike_rewinds_and_the_skipped_batches_stay_skipped(data, shared_dir):
    spikes = "debug.faults=[{kind: spike, batch: 7, rank: 1, value: 50}, {kind: spike, batch: 8, rank: 1, value: 50}]"
    common = ["checkpoint.interval=3", "checkpoint.keep=5", "guard.spike_warmup=5", "guard.rewind_after=2",
              "guard.rewind_margin=1"]
    plain = Batches()
    train(load_config(None, tiny(data, os.path.join(shared_dir, "plain"), "train.steps=17", *common)), [plain])
    assert sorted(plain.seen) == list(range(17))
    run = os.path.join(shared_dir, "rewound")
    rewound = Batches()
    result = train(load_config(None, tiny(data, run, "train.steps=14", spikes, *common)), [rewound])
    # the spikes at batches 7 and 8 (steps 8 and 9) send the run back to step 6, skipping batches 6, 7, 8
    skips = json.load(open(os.path.join(run, "skipped_batches.json")))
    assert skips["ranges"] == [[6, 9]] and skips["rewinds"][0]["to_step"] == 6
    trained = [r["batch"] for r in result.history]
    assert [r["step"] for r in result.history] == list(range(1, 15)) and trained == [0, 1, 2, 3, 4, 5, *range(9, 17)]
    # the samples trained are exactly the uninterrupted run's minus the skipped batches
    assert {rewound.seen[b] for b in trained} == {plain.seen[b] for b in range(17) if b not in (6, 7, 8)}
    events = [json.loads(line)["event"] for line in open(os.path.join(run, "events.jsonl"))] if dist.get_rank() == 0 else []
    assert dist.get_rank() or (events.count("spike") == 2 and events.count("rewind") == 1)
    # a restart from a checkpoint older than the rewind (here: the one it rewound to) skips them too
    if dist.get_rank() == 0:
        for n in os.listdir(os.path.join(run, "checkpoints")):
            if n.startswith("step-") and n != "step-00000006":
                shutil.rmtree(os.path.join(run, "checkpoints", n))
    dist.barrier()
    again = Batches()
    result = train(load_config(None, tiny(data, run, "train.steps=10", spikes, *common)), [again])
    assert [r["batch"] for r in result.history] == [9, 10, 11, 12]
    assert {again.seen[b] for b in (9, 10, 11, 12)} == {plain.seen[b] for b in (9, 10, 11, 12)}


@pytest.mark.world(2)
def test_any_exception_on_rank0_reaches_every_rank():
    def broken():
        raise OSError(28, "No space left on device")
    with pytest.raises((OSError, BigtrainError)) as e:
        on_rank0(broken)
    if dist.get_rank() == 0:
        assert isinstance(e.value, OSError)
    else:
        assert isinstance(e.value, BigtrainError)
        assert str(e.value) == "rank 0 failed in broken: OSError: [Errno 28] No space left on device"


@pytest.mark.world(2)
def test_ranks_that_disagree_on_the_config_stop_at_once(data, shared_dir):
    """run.dir taken from a per-node variable: each rank would wait on the other's files forever."""
    with pytest.raises(BigtrainError) as e:
        train(load_config(None, tiny(data, os.path.join(shared_dir, f"r{dist.get_rank()}"))))
    assert str(e.value) == (f"the ranks disagree on the config: rank 1 has run.dir={os.path.join(shared_dir, 'r1')!r}, "
                            f"rank 0 has {os.path.join(shared_dir, 'r0')!r} (every rank must get the same config)")
