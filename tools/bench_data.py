"""Loader throughput: bigtrain's streaming loader vs plain WebDataset vs a raw numpy memmap, same tokens.

Writes (in --workdir, default a temporary directory) random token ids packed at seq 2048 three ways:
bigtrain shards (64 samples per .npy member), plain WebDataset shards with one .npy per sample, and one
.npy file read through a memmap. Then reads each once, in one process, and prints tokens/s (ids delivered,
seq_len + 1 per sample). The loader is read through `build_train_source` with num_workers=0, delivering int64
batches; plain WebDataset is `webdataset.WebDataset(urls).decode()`; the memmap copies batches to int64.

    python tools/bench_data.py [--tokens 64e6] [--seq-len 2048] [--workdir DIR]

Last line: tokens_per_s=<N> ratio_to_plain_wds=<P> ratio_to_mmap=<R>
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bigtrain.config.schema import Config, DataSource  # noqa: E402
from bigtrain.data import build_train_source  # noqa: E402
from bigtrain.data.shards import ShardWriter, npy_bytes  # noqa: E402


def build(work, tokens, seq_len, vocab, shard_samples):
    L = seq_len + 1
    n = int(tokens) // L
    samples = np.random.default_rng(0).integers(0, vocab, (n, L), dtype=np.uint16)
    w = ShardWriter(os.path.join(work, "bigtrain"), seq_len, vocab, samples_per_member=64, shard_samples=shard_samples)
    w.add(samples.reshape(-1))
    w.close()
    import webdataset as wds
    plain = os.path.join(work, "plain")
    os.makedirs(plain, exist_ok=True)
    urls = []
    for s in range(0, n, shard_samples):
        urls.append(os.path.join(plain, f"plain-{s // shard_samples:06d}.tar"))
        with wds.TarWriter(urls[-1], encoder=False) as t:
            for i in range(s, min(n, s + shard_samples)):
                t.write({"__key__": f"{i:09d}", "npy": npy_bytes(samples[i])})
    np.save(os.path.join(work, "tokens.npy"), samples)
    return n, urls


def timed(label, fn):
    t = time.perf_counter()
    ids = fn()
    dt = time.perf_counter() - t
    print(f"{label:<48} {ids / 1e6:8.1f}M ids in {dt:6.2f}s = {ids / dt / 1e6:8.1f}M tokens/s", flush=True)
    return ids / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=64e6, help="token ids written (each way)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64, help="global batch (samples) per loader step")
    ap.add_argument("--shard-samples", type=int, default=2048)
    ap.add_argument("--passes", type=int, default=4, help="epochs the loader streams (it cycles; others read once)")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.workdir) as work:
        t = time.perf_counter()
        n, urls = build(work, a.tokens, a.seq_len, 32000, a.shard_samples)
        L = a.seq_len + 1
        print(f"wrote {n} samples x {L} ids three ways in {time.perf_counter() - t:.1f}s ({work})", flush=True)

        cfg = Config()
        cfg.data.sources = [DataSource(path=os.path.join(work, "bigtrain"))]
        cfg.model.seq_length, cfg.model.vocab_size, cfg.train.global_batch_size = a.seq_len, 32000, a.batch
        src = build_train_source(cfg, 0, 1)
        src.next_batch()  # warm-up: imports, first shard opens
        steps = a.passes * n // a.batch - 1

        def loader():
            for _ in range(steps):
                b = src.next_batch()
            assert b.dtype.is_floating_point is False and tuple(b.shape) == (a.batch, L)
            return steps * a.batch * L

        def plain_wds():
            import webdataset as wds
            ids = 0
            for sample in wds.WebDataset(urls, shardshuffle=False).decode():
                ids += sample["npy"].size
            return ids

        def mmap():
            import torch
            mm = np.load(os.path.join(work, "tokens.npy"), mmap_mode="r")
            for i in range(0, n - a.batch + 1, a.batch):
                b = torch.from_numpy(mm[i:i + a.batch].astype(np.int64))
            return (n // a.batch) * a.batch * L

        plain_wds()  # warm the page cache and imports alike for every reader
        ours = timed(f"bigtrain loader ({src.K} lanes, {a.passes} epochs, int64 batches)", loader)
        src.close()
        pw = timed("plain webdataset.WebDataset(urls).decode()", plain_wds)
        mm = timed("numpy memmap -> int64 batches", mmap)
    print(f"tokens_per_s={ours:.0f} ratio_to_plain_wds={ours / pw:.2f} ratio_to_mmap={ours / mm:.3f}")


if __name__ == "__main__":
    main()
