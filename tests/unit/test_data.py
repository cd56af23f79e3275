"""Token shards and the streaming loader, on real text (stdlib sources + Chinese) and real WebDataset tars.

The data-parallel tests simulate D ranks in one process: D sources with dp_rank 0..D-1, whose batches
interleave (rank r holds global rows r, r + D, ...) back into the global batch; their `local_state()`s merge
into the global state that `state_dict()` gathers over torch.distributed in a real run.
"""
import filecmp
import glob
import hashlib
import json
import logging
import os
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds

from bigtrain.config.schema import Config, DataSource
from bigtrain.data import build_train_source, build_validation_source, check_data, merge_states, write_shards
from bigtrain.errors import BigtrainError
SEQ = 32  # seq_len of the `shards` fixture (conftest.py)
G = 12  # global batch: divisible by the DP sizes 1, 2, 3, 4


def make_cfg(sources, *, lanes=4, vocab=1000, tokenizer="", seq=SEQ, batch=G, **data):
    c = Config()
    c.data.sources = [DataSource(path=p, weight=w) for p, w in sources]
    c.data.lanes, c.data.tokenizer = lanes, tokenizer
    c.model.seq_length, c.model.vocab_size, c.train.global_batch_size = seq, vocab, batch
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


def read_global(cfg, D, steps, state=None):
    """`steps` global batches read by D simulated ranks (optionally restored from `state`), and the merged state."""
    ranks = [build_train_source(cfg, r, D) for r in range(D)]
    try:
        if state is not None:
            for s in ranks:
                s.load_state_dict(json.loads(json.dumps(state)))  # as it travels through a checkpoint
        out = []
        for _ in range(steps):
            batch = np.empty((cfg.train.global_batch_size, cfg.model.seq_length + 1), np.int64)
            for r, s in enumerate(ranks):
                b = s.next_batch()
                assert b.dtype.is_floating_point is False and b.shape == (cfg.train.global_batch_size // D, SEQ + 1)
                batch[r::D] = b.numpy()
            out.append(batch)
        return np.concatenate(out), merge_states([s.local_state() for s in ranks])
    finally:
        for s in ranks:
            s.close()


def shard_rows(d):
    """Every sample of a shard directory, read with plain WebDataset in manifest order."""
    urls = [os.path.join(d, s["name"]) for s in json.load(open(os.path.join(d, "manifest.json")))["shards"]]
    return np.concatenate([x["npy"] for x in wds.WebDataset(urls, shardshuffle=False).decode()])


# ---------------------------------------------------------------------------------------------- shards

def test_shards_are_plain_webdataset(shards, tokenizer, stdlib):
    d = shards["a"]
    m = json.load(open(os.path.join(d, "manifest.json")))
    assert m["seq_len"] == SEQ and m["dtype"] == "uint16" and m["vocab_size"] == 1000 and m["eos_id"] == 2
    assert m["tokenizer"]["sha256"] == hashlib.sha256(open(tokenizer, "rb").read()).hexdigest()
    urls = sorted(glob.glob(os.path.join(d, "*.tar")))
    assert [os.path.basename(u) for u in urls] == [s["name"] for s in m["shards"]]
    keys, n = [], 0
    for x in wds.WebDataset(urls, shardshuffle=False).decode():
        a = x["npy"]
        assert a.dtype == np.uint16 and a.ndim == 2 and a.shape[1] == SEQ + 1 and 1 <= len(a) <= 8
        keys.append(x["__key__"])
        n += len(a)
    assert keys == [f"{i:09d}" for i in range(len(keys))] and len(keys) == sum(s["members"] for s in m["shards"])
    assert n == m["samples"] == sum(s["samples"] for s in m["shards"]) and m["tokens"] == n * (SEQ + 1)
    assert all(s["samples"] == 64 for s in m["shards"][:-1]) and 0 < m["shards"][-1]["samples"] <= 64
    assert 0 <= m["dropped_tokens"] < SEQ + 1
    assert m["documents"] == len(glob.glob(f"{stdlib}/email/*.py")) + len(glob.glob(f"{stdlib}/logging/*.py"))
    for s in m["shards"]:
        assert hashlib.sha256(open(os.path.join(d, s["name"]), "rb").read()).hexdigest() == s["sha256"]
    rows = shard_rows(d)
    assert rows.max() == max(s["max_token_id"] for s in m["shards"]) < 1000
    assert (rows == 2).sum() >= m["documents"] - 1  # documents joined with EOS
    with tarfile.open(urls[0]) as t:
        assert all(i.mtime == 0 and i.uid == i.gid == 0 and i.uname == i.gname == "" and not i.pax_headers
                   for i in t.getmembers())


def test_shards_byte_identical_for_1_and_2_workers(corpus, tokenizer, tmp_path):
    for w in (1, 2):
        write_shards(tokenizer=tokenizer, inputs=corpus["b"], output=str(tmp_path / f"w{w}"), seq_len=SEQ,
                     samples_per_member=4, shard_samples=12, workers=w)
    names = sorted(os.listdir(tmp_path / "w1"))
    assert names == sorted(os.listdir(tmp_path / "w2")) and len(names) > 10
    assert filecmp.cmpfiles(tmp_path / "w1", tmp_path / "w2", names, shallow=False)[0] == names


def test_shards_jsonl_text_key_and_refusals(corpus, tokenizer, shards, chinese, tmp_path):
    with pytest.raises(BigtrainError, match=r"zh\.jsonl\.gz:1: no text field 'body'"):
        write_shards(tokenizer=tokenizer, inputs=[corpus["zh"]], output=str(tmp_path / "x"), seq_len=SEQ,
                     text_key="body", workers=1)
    with pytest.raises(BigtrainError, match="manifest.json exists"):
        write_shards(tokenizer=tokenizer, inputs=corpus["b"], output=shards["b"], seq_len=SEQ, workers=1)
    with pytest.raises(BigtrainError, match="matches no file"):
        write_shards(tokenizer=tokenizer, inputs=[str(tmp_path / "none" / "*.txt")], output=str(tmp_path / "y"),
                     seq_len=SEQ, workers=1)
    m = write_shards(tokenizer=tokenizer, inputs=[corpus["zh"]], output=str(tmp_path / "zh"), seq_len=SEQ,
                     workers=1, append_eos=False)
    assert m["documents"] == len(chinese) and (shard_rows(str(tmp_path / "zh")) != 2).all()


# ---------------------------------------------------------------------------------------------- exact resume

STEPS, SAVE = 150, 70


@pytest.fixture(scope="module")
def blended(shards):
    cfg = make_cfg([(shards["a"], 1.0), (shards["b"], 1.0)])
    ref, state = read_global(cfg, 1, STEPS)
    assert max(st["pos"][1][0] for st in state["lane_state"]) >= 1  # source b went through epochs
    return cfg, ref


@pytest.mark.parametrize("d_save,d_load", [(1, 1), (2, 2), (4, 4), (2, 4), (4, 1), (3, 2)])
def test_restore_continues_global_sequence(blended, d_save, d_load):
    """Read SAVE steps on d_save ranks, restore on d_load ranks, read on: the same samples, in the same order,
    as one uninterrupted single-rank stream (3 ranks: 4 lanes not divisible, every rank reads every lane)."""
    cfg, ref = blended
    head, state = read_global(cfg, d_save, SAVE)
    assert (head == ref[:SAVE * G]).all()
    tail, _ = read_global(cfg, d_load, STEPS - SAVE, state)
    assert (tail == ref[SAVE * G:]).all()


def test_batch_smaller_than_lane_count(shards):
    """G = 2 with 4 lanes: some lanes give nothing to a step; DP 2 and a restore still follow the global order."""
    cfg = make_cfg([(shards["a"], 1.0), (shards["b"], 1.0)], batch=2)
    ref, _ = read_global(cfg, 1, 30)
    head, state = read_global(cfg, 2, 13)
    tail, _ = read_global(cfg, 1, 17, state)
    assert (np.concatenate([head, tail]) == ref).all()


def test_state_dict_single_rank_and_mismatches(blended, shards):
    cfg, ref = blended
    src = build_train_source(cfg, 0, 1)
    for _ in range(5):
        src.next_batch()
    state = src.state_dict()
    assert state == merge_states([src.local_state()]) and state["index"] == 5 * G and len(state["lane_state"]) == 4
    src.close()
    with pytest.raises(BigtrainError, match="lanes=4.*data.lanes=4"):
        build_train_source(make_cfg([(shards["a"], 1.0), (shards["b"], 1.0)], lanes=2), 0, 1).load_state_dict(state)
    with pytest.raises(BigtrainError, match=r"source 1 \('b'\) has weight 2.0, the checkpoint has 1.0"):
        build_train_source(make_cfg([(shards["a"], 1.0), (shards["b"], 2.0)]), 0, 1).load_state_dict(state)
    with pytest.raises(BigtrainError, match="saved with 2 sources"):
        build_train_source(make_cfg([(shards["a"], 1.0)]), 0, 1).load_state_dict(state)


def test_workers_give_the_same_stream(blended):
    cfg, ref = blended
    cfg_w = make_cfg([(s.path, s.weight) for s in cfg.data.sources], num_workers=2)
    _, state_inproc = read_global(cfg, 1, SAVE)
    src = build_train_source(cfg_w, 0, 1)
    try:
        head = np.concatenate([src.next_batch().numpy() for _ in range(SAVE)])
        assert (head == ref[:SAVE * G]).all()
        assert src.state_dict() == state_inproc  # the state of what was consumed, not of what was prefetched
        _, state_2 = read_global(cfg, 2, 40)
        src.load_state_dict(state_2)  # restarts the workers at another position
        tail = np.concatenate([src.next_batch().numpy() for _ in range(STEPS - 40)])
        assert (tail == ref[40 * G:]).all()
    finally:
        src.close()


def test_blend_proportions(shards):
    """Weights 1:3 over 4 lanes: the share of source b in 3600 samples is 0.75 within +-0.03 (about 4.4 binomial
    standard deviations; the draw is deterministic, so this is a fixed check of the hash-based blend)."""
    rows_b = {r.tobytes() for r in shard_rows(shards["b"])}
    rows_a = {r.tobytes() for r in shard_rows(shards["a"])}
    assert not rows_a & rows_b
    out, state = read_global(make_cfg([(shards["a"], 1.0), (shards["b"], 3.0)]), 1, 300)
    out = out.astype(np.uint16)
    from_b = np.array([r.tobytes() in rows_b for r in out])
    assert all(r.tobytes() in rows_a for r in out[~from_b])
    assert abs(from_b.mean() - 0.75) < 0.03, from_b.mean()
    for lane in range(4):  # each lane's blend also follows the weights
        assert abs(from_b[lane::4].mean() - 0.75) < 0.06


# ---------------------------------------------------------------------------------------------- sources

def test_url_list_and_pipe_sources_match_the_directory(shards):
    d = shards["b"]
    n = len(json.load(open(os.path.join(d, "manifest.json")))["shards"])
    braces = os.path.join(d, f"shard-{{000000..{n - 1:06d}}}.tar")
    ref, _ = read_global(make_cfg([(d, 1.0)]), 1, 40)
    for path in (braces, f"pipe:cat {braces}"):
        out, _ = read_global(make_cfg([(path, 1.0)]), 2, 40)
        assert (out == ref).all(), path


def test_validation_source(shards):
    cfg = make_cfg([(shards["a"], 1.0)])
    assert build_validation_source(cfg, 0, 1) is None
    cfg.data.validation = shards["val"]
    v = build_validation_source(cfg, 0, 1)
    first = [b.numpy() for b in v.batches(5)]
    again = [b.numpy() for b in v.batches(3)]
    assert all((a == b).all() for a, b in zip(first, again))  # every evaluation starts from the beginning
    plain = shard_rows(shards["val"])
    assert (np.concatenate(first) == plain[:5 * G]).all()  # plain order
    halves = [list(build_validation_source(cfg, r, 2).batches(5)) for r in range(2)]
    for step in range(5):
        g = np.empty((G, SEQ + 1), np.int64)
        g[0::2], g[1::2] = halves[0][step].numpy(), halves[1][step].numpy()
        assert (g == first[step]).all()


# ---------------------------------------------------------------------------------------------- bad input

def _member_offsets(path):
    with tarfile.open(path) as t:
        return [(m.name, m.offset_data) for m in t.getmembers()]


@pytest.fixture
def damaged(shards, tmp_path):
    """A copy of source b with shard 1 truncated inside its second member, member 0 of shard 3 corrupted (its
    .npy header overwritten) and shard 5 deleted: 2 + 1 + 3 bad members."""
    d = str(tmp_path / "b")
    shutil.copytree(shards["b"], d)
    p1, p3 = os.path.join(d, "shard-000001.tar"), os.path.join(d, "shard-000003.tar")
    with open(p1, "r+b") as f:
        f.truncate(_member_offsets(p1)[1][1] + 100)
    with open(p3, "r+b") as f:
        f.seek(_member_offsets(p3)[0][1])
        f.write(b"garbage!")
    os.remove(os.path.join(d, "shard-000005.tar"))
    return d, _member_offsets(os.path.join(shards["b"], "shard-000003.tar"))[0][0]


def test_corrupt_members_are_skipped_counted_and_logged(damaged, shards, caplog):
    damaged, bad_member = damaged
    m = json.load(open(os.path.join(damaged, "manifest.json")))
    members = sum(s["members"] for s in m["shards"])
    good = m["samples"] - 12 - 8 - 4  # less shard 5, members 1-2 of shard 1, member 0 of shard 3
    cfg = make_cfg([(damaged, 1.0)], lanes=1, batch=1, max_skip_fraction=0.1)
    cfg.data.validation = damaged  # plain order: one epoch, then the first sample of the next
    with caplog.at_level(logging.WARNING, logger="bigtrain.data"):
        got = np.concatenate([b.numpy() for b in build_validation_source(cfg, 0, 1).batches(good + 1)])
    plain = shard_rows(shards["b"])
    keep = np.ones(len(plain), bool)
    keep[12 + 4:12 + 12] = keep[36:40] = keep[60:72] = False
    assert (got[:good] == plain[keep]).all() and (got[good] == plain[0]).all()
    text = caplog.text
    assert "shard-000001.tar (from member 1)" in text and f"shard-000003.tar member {bad_member}" in text
    assert "shard-000005.tar" in text and "No such file" in text
    # the shuffled training stream: every epoch passes each bad member once
    _, state = read_global(cfg, 1, 2 * good + 1)
    assert 12 <= sum(st["skipped"] for st in state["lane_state"]) <= 18
    assert sum(st["seen"] for st in state["lane_state"]) >= 2 * members
    # ... and it is deterministic and resumable across the damage
    cfg2 = make_cfg([(damaged, 1.0)], lanes=2, max_skip_fraction=0.1)
    ref2, _ = read_global(cfg2, 1, 100)
    head, st = read_global(cfg2, 2, 37)
    tail, _ = read_global(cfg2, 1, 63, st)
    assert (np.concatenate([head, tail]) == ref2).all()


def test_flipped_bit_in_a_member_payload_is_caught_by_its_checksum(shards, tmp_path, caplog):
    """One token id changed by one (still a valid id, so decoding alone would train on it): the member's
    `.npy.xxh3` companion no longer matches; the member is skipped, counted and named, the rest read as before."""
    d = str(tmp_path / "b")
    shutil.copytree(shards["b"], d)
    p2 = os.path.join(d, "shard-000002.tar")
    name, offset = [m for m in _member_offsets(p2) if m[0].endswith(".npy")][1]
    with open(p2, "r+b") as f:
        f.seek(offset + 128 + 2 * 7)  # past the .npy header: the low byte of the 8th token id
        b = f.read(1)
        f.seek(offset + 128 + 2 * 7)
        f.write(bytes([b[0] ^ 1]))
    cfg = make_cfg([(d, 1.0)], lanes=1, batch=1, max_skip_fraction=0.1)
    cfg.data.validation = d
    total = json.load(open(os.path.join(d, "manifest.json")))["samples"]
    with caplog.at_level(logging.WARNING, logger="bigtrain.data"):
        got = np.concatenate([b.numpy() for b in build_validation_source(cfg, 0, 1).batches(total - 4)])
    plain = shard_rows(shards["b"])
    keep = np.ones(len(plain), bool)
    keep[24 + 4:24 + 8] = False  # shard 2 starts at sample 24; its second member holds samples 4-7
    assert (got == plain[keep]).all()
    assert f"shard-000002.tar member {name}: checksum mismatch" in caplog.text


def test_skip_fraction_limit_stops_the_run(damaged):
    """6 bad of about 140 members: over 0.005 x max(members seen, 1000) within the first epoch."""
    damaged, _ = damaged
    cfg = make_cfg([(damaged, 1.0)], lanes=1, max_skip_fraction=0.005)
    with pytest.raises(BigtrainError, match=r"skipped 6 of \d+ shard members.*max_skip_fraction=0.005; last bad: "
                                            r".*shard-00000[135]\.tar"):
        read_global(cfg, 1, 100)


def test_manifest_checks_at_start(shards, tokenizer, corpus, tmp_path):
    from bigtrain.data import train_tokenizer
    a = shards["a"]
    check_data(make_cfg([(a, 1.0)], tokenizer=tokenizer))
    other = train_tokenizer(corpus["b"], 600, str(tmp_path / "sp600"))
    with pytest.raises(BigtrainError, match=rf"{a}/manifest.json: vocab_size 1000 differs from data.tokenizer .*sp600.model \(600\)"):
        build_train_source(make_cfg([(a, 1.0)], tokenizer=other), 0, 1)
    same_size = train_tokenizer(corpus["a"], 1000, str(tmp_path / "sp1000b"))
    with pytest.raises(BigtrainError, match=rf"{a}/manifest.json: written with tokenizer sp1000.model \(sha256 \w{{12}}\), "
                                            r"not data.tokenizer .*sp1000b.model"):
        build_train_source(make_cfg([(a, 1.0)], tokenizer=same_size), 0, 1)
    with pytest.raises(BigtrainError, match=rf"{a}/shard-\d+\.tar: holds token id \d+ >= model.vocab_size=500"):
        build_train_source(make_cfg([(a, 1.0)], vocab=500), 0, 1)
    with pytest.raises(BigtrainError, match=rf"{a}/manifest.json: shards hold seq_len 32, but model.seq_length is 64"):
        build_train_source(make_cfg([(a, 1.0)], seq=64), 0, 1)
    with pytest.raises(BigtrainError, match=r"source 'a' .* has \d+ shards, fewer than the 1000 lanes of data.lanes=1000"):
        build_train_source(make_cfg([(a, 1.0)], lanes=1000), 0, 1)
    with pytest.raises(BigtrainError, match="no manifest.json"):
        build_train_source(make_cfg([(str(tmp_path), 1.0)]), 0, 1)


def test_token_id_at_or_above_vocab_fails_at_run_time(shards):
    """A URL list has no manifest to check at start: the member holding the id fails when read."""
    urls = os.path.join(shards["a"], "shard-{000000..000009}.tar")
    src = build_train_source(make_cfg([(urls, 1.0)], lanes=0, vocab=600), 0, 1)
    assert src.K == 10
    with pytest.raises(BigtrainError, match=r"shard-0000\d\d\.tar member \d{9}\.npy: token id \d+ >= model.vocab_size=600"):
        for _ in range(20):
            src.next_batch()
    src.close()
