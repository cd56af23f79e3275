"""Shard-building throughput: `bigtrain shards` (the real write_shards and its process pool) against the raw
tokenizer in the same run, per input format.

Corpus (offline, real): the Python standard library's sources, as `data.prepare: stdlib` uses them. The first
--mb MB of its files become many documents, written five ways: one .txt per document, .jsonl, .jsonl.gz,
.jsonl.zst and .parquet; --big-mb MB of them concatenated become one large single-document .txt. Tokenizer: the
quickstart's (a sentencepiece BPE, vocab --vocab, trained on the stdlib by bigtrain's own trainer; cached in
--cache) unless --tokenizer names one.

Raw rate: one process encoding the documents already in memory, with the tokenizer library's fastest
single-thread call (sentencepiece: a batch of about 1 MB per call, numpy output; the per-document `encode`
rate is shown too); the large document encoded whole in one call. It is taken in tokens per CPU-second of that
process (= its tokens/s on a core of its own; wall-clock tokens/s is printed too, but on a machine shared with
other work it measures the load as much as the tokenizer), the better of a measurement before and after the
runs. Shards: `write_shards(..., workers=cores)` timed from the call to its return (reading, the pool's start,
tokenizing, writing; webdataset, which imports torch, is imported beforehand), EOS tokens counted on both
sides. Goal: shards tokens/s >= 0.9 x cores x the raw rate. Every run is checked: the shards' ids equal the raw
encoding of the same documents, in order, each followed by EOS. Also printed: the pool's start-up (spawning the
workers, loading the tokenizer) and the "steady" ratio without it, as in a long run; the cores the machine
actually gave the run (CPU-seconds of all its processes / wall) and the CPU efficiency (tokens per CPU-second,
start-up left out, / raw's): the ratio an idle machine would show, less the main process's share.

    python tools/bench_shards.py [--mb 8] [--big-mb 15] [--workers N] [--tokenizer PATH] [--code DIR]

--code DIR runs another checkout's bigtrain (e.g. the previous commit, for before/after figures); formats it
cannot read are skipped. Last line: ratio <format>=<shards tokens/s / (cores x raw tokens per CPU-second)> ...
"""
import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np

GOAL = 0.9


def _start(tokenizer):  # the pool start-up probe's initializer: what a tokenizer process does before its first task
    from bigtrain.data.tokenizer import load_tokenizer
    load_tokenizer(tokenizer)


def _noop(x):
    return x


_barrier = None


def _probe_init(barrier):
    global _barrier
    _barrier = barrier


def _probe(args):
    """One of `cores` raw encoders run at once (the machine's own parallel ceiling): (start, end, tokens)."""
    tokpath, files = args
    from bigtrain.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tokpath)
    docs = [open(f, encoding="utf-8", newline="").read() for f in files]
    raw_rates(tok, docs[:20], plain=False)  # warm, as a worker is after its first task
    _barrier.wait()
    t = time.perf_counter()
    n = len(raw_rates(tok, docs, plain=False)[3])
    return t, time.perf_counter(), n


def _cpu() -> np.ndarray:
    """CPU-seconds of this process and of its finished children (the pool's workers, once joined)."""
    import resource
    return np.array([r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                        resource.getrusage(resource.RUSAGE_CHILDREN))])


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def stdlib_docs(mb: float, reverse: bool = False):
    from bigtrain.data.corpus import stdlib_inputs
    from bigtrain.data.tokenizer import expand_inputs
    files = expand_inputs(stdlib_inputs(False))
    docs, size = [], 0
    for f in reversed(files) if reverse else files:
        with open(f, encoding="utf-8", errors="replace", newline="") as fh:
            docs.append(fh.read())
        size += len(docs[-1].encode())
        if size >= mb * 1e6:
            break
    return docs


def tokenizer_path(a) -> str:
    if a.tokenizer:
        return a.tokenizer
    path = os.path.join(a.cache, f"stdlib-sp{a.vocab}.model")
    if not os.path.exists(path):
        from bigtrain.data.corpus import stdlib_inputs
        from bigtrain.data.tokenizer import train_tokenizer
        print(f"training the quickstart tokenizer (vocab {a.vocab}) -> {path} (once)", flush=True)
        train_tokenizer(stdlib_inputs(False), a.vocab, path.removesuffix(".model"))
    return path


def raw_rates(tok, docs, plain=True):
    """(tokens/s batched, tokens per CPU-second batched, tokens/s per-document encode (if `plain`), ids with EOS
    after each document) in one process."""
    eos = np.array([tok.eos_id], np.int64)
    sp, numpy_out = tok._sp, False
    if sp is not None:
        import inspect
        numpy_out = "return_type" in inspect.signature(type(sp).Encode).parameters
    t, c = time.perf_counter(), time.process_time()
    out, batch, size = [], [], 0
    for i, d in enumerate(docs):
        batch.append(d)
        size += len(d)
        if size >= 1 << 20 or i == len(docs) - 1:
            if sp is None:
                arrays = [np.array(tok.encode(x), np.int64) for x in batch]
            elif numpy_out:
                arrays = sp.encode(batch, num_threads=1, return_type="numpy")
            else:
                arrays = [np.array(x, np.int64) for x in sp.encode(batch, num_threads=1)]
            out += [x for a in arrays for x in (a, eos)]
            batch, size = [], 0
    batched, cpu = time.perf_counter() - t, time.process_time() - c
    ids = np.concatenate(out)
    if not plain:
        return len(ids) / batched, len(ids) / cpu, None, ids
    t = time.perf_counter()
    n = sum(len(tok.encode(d)) + 1 for d in docs)
    plain = time.perf_counter() - t
    assert n == len(ids)
    return len(ids) / batched, len(ids) / cpu, n / plain, ids


def shard_ids(d):
    import json
    import tarfile
    import io
    m = json.load(open(os.path.join(d, "manifest.json")))
    rows = []
    for s in m["shards"]:
        with tarfile.open(os.path.join(d, s["name"])) as t:
            for mem in sorted(t.getmembers(), key=lambda x: x.name):
                if mem.name.endswith(".npy"):
                    rows.append(np.load(io.BytesIO(t.extractfile(mem).read())).reshape(-1))
    return np.concatenate(rows) if rows else np.zeros(0, np.int64), m


def write_inputs(work, docs, big):
    import gzip
    import json
    os.makedirs(os.path.join(work, "txt"))
    for i, d in enumerate(docs):
        with open(os.path.join(work, "txt", f"{i:05d}.txt"), "w", encoding="utf-8", newline="") as f:
            f.write(d)
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    paths = {"txt": [os.path.join(work, "txt", "*.txt")]}
    for name, data in (("jsonl", lines), ("jsonl.gz", gzip.compress(lines, 6))):
        paths[name] = [os.path.join(work, f"docs.{name}")]
        with open(paths[name][0], "wb") as f:
            f.write(data)
    try:
        import zstandard
        paths["jsonl.zst"] = [os.path.join(work, "docs.jsonl.zst")]
        with open(paths["jsonl.zst"][0], "wb") as f:
            f.write(zstandard.ZstdCompressor(level=3).compress(lines))
    except ImportError:
        print("zstandard is not installed: no .jsonl.zst run")
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths["parquet"] = [os.path.join(work, "docs.parquet")]
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), paths["parquet"][0], row_group_size=256)
    paths["big.txt"] = [os.path.join(work, "big.txt")]
    with open(paths["big.txt"][0], "w", encoding="utf-8", newline="") as f:
        f.write(big)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8, help="MB of stdlib documents for the many-document formats")
    ap.add_argument("--big-mb", type=float, default=15, help="MB of the one large single-document .txt")
    ap.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: the cores this process "
                                                          "may use)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer file (default: the quickstart's, trained once)")
    ap.add_argument("--vocab", type=int, default=8000, help="vocab of the default tokenizer (tiny.yaml's)")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "bigtrain"))
    ap.add_argument("--formats", default="txt,jsonl,jsonl.gz,jsonl.zst,parquet,big.txt")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=1, help="runs per format; the fastest counts")
    ap.add_argument("--code", default=None, help="import bigtrain from this checkout instead")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.abspath(a.code) if a.code else here)
    import multiprocessing
    import bigtrain.data.shards as shards
    from bigtrain.data.tokenizer import load_tokenizer
    try:
        import bigtrain.data.inputs  # noqa: F401
        new_formats = True
    except ImportError:
        new_formats = False
    os.makedirs(a.cache, exist_ok=True)
    n_cores = cores()
    workers = a.workers or n_cores
    tokpath = tokenizer_path(a)
    tok = load_tokenizer(tokpath)
    print(f"bigtrain from {os.path.dirname(os.path.dirname(shards.__file__))}; {n_cores} cores, {workers} workers; "
          f"load average {os.getloadavg()[0]:.1f}; tokenizer {tokpath} (vocab {tok.vocab_size})", flush=True)

    docs = stdlib_docs(a.mb)
    big = "".join(stdlib_docs(a.big_mb, reverse=True))
    with tempfile.TemporaryDirectory(dir=a.workdir) as work:
        paths = write_inputs(work, docs, big)
        raw, raw_cpu, plain, want = raw_rates(tok, docs)
        print(f"raw, one process, {len(docs)} documents ({sum(map(len, docs)) / 1e6:.1f}M chars, {len(want)} tokens): "
              f"{raw / 1e6:.3f}M tokens/s batched ({raw_cpu / 1e6:.3f}M per CPU-second), {plain / 1e6:.3f}M "
              "per-document encode", flush=True)
        t, c = time.perf_counter(), time.process_time()
        big_want = np.array(tok.encode(big) + [tok.eos_id])
        raw_big, raw_big_cpu = len(big_want) / (time.perf_counter() - t), len(big_want) / (time.process_time() - c)
        print(f"raw, one process, one {len(big.encode()) / 1e6:.1f} MB document ({len(big_want)} tokens): "
              f"{raw_big / 1e6:.3f}M tokens/s ({raw_big_cpu / 1e6:.3f}M per CPU-second)", flush=True)
        import webdataset  # noqa: F401  (imports torch: seconds, once per `bigtrain shards`, not timed here)
        start = start_cpu = float("inf")
        for _ in range(2):  # the faster of two
            r0, t = _cpu(), time.perf_counter()
            with multiprocessing.get_context("spawn").Pool(workers, _start, (tokpath,)) as pool:
                pool.map(_noop, range(workers))
            start, start_cpu = min(start, time.perf_counter() - t), min(start_cpu, (_cpu() - r0).sum())
        print(f"pool start-up (spawn {workers} processes, load the tokenizer): {start:.2f}s, {start_cpu:.2f} "
              "CPU-seconds", flush=True)

        rows = []
        ctx = multiprocessing.get_context("spawn")
        probe = ctx.Pool(workers, _probe_init, (ctx.Barrier(workers),))
        probe_files, size = [], 0  # about 2 MB of the documents, for the ceiling probes
        for f in sorted(glob.glob(paths["txt"][0])):
            probe_files.append(f)
            size += os.path.getsize(f)
            if size >= 2e6:
                break
        for fmt in a.formats.split(","):
            if fmt in ("jsonl.zst", "parquet") and not new_formats:
                print(f"{fmt}: not readable by this bigtrain", flush=True)
                continue
            if fmt not in paths:
                continue
            expect = big_want if fmt == "big.txt" else want
            best = None
            for r in range(a.repeat):
                got = probe.map(_probe, [(tokpath, probe_files)] * workers, chunksize=1)
                ceiling = sum(n for *_, n in got) / (max(e for _, e, _ in got) - min(s for s, _, _ in got))
                out = os.path.join(work, f"out-{fmt}-{r}")
                r0, t = _cpu(), time.perf_counter()
                shards.write_shards(tokpath, paths[fmt], out, a.seq_len, shard_samples=1024, workers=workers)
                wall, (main_cpu, pool_cpu) = time.perf_counter() - t, _cpu() - r0
                got, m = shard_ids(out)
                n = m["tokens"] + m["dropped_tokens"]
                assert n == len(expect) and np.array_equal(got, expect[:len(got)]), \
                    f"{fmt}: ids differ from the raw encoding"
                if best is None or wall < best[2]:
                    best = (fmt, n, wall, main_cpu, main_cpu + pool_cpu, ceiling)
            rows.append(best)
            print(f"{fmt}: {best[1]} tokens in {best[2]:.2f}s = {best[1] / best[2] / 1e6:.3f}M tokens/s "
                  f"(ids equal to the raw encoding)", flush=True)
        probe.close()
        probe.join()
        # the raw rate again, after: the machine's load drifts; the faster of the two is the baseline
        raw2, raw_cpu2, _, _ = raw_rates(tok, docs, plain=False)
        print(f"raw again, after: {raw2 / 1e6:.3f}M tokens/s batched ({raw_cpu2 / 1e6:.3f}M per CPU-second)",
              flush=True)
        raw_cpu = max(raw_cpu, raw_cpu2)

    print(f"\nbaseline: raw {raw_cpu / 1e6:.3f}M tokens per CPU-second (many documents), {raw_big_cpu / 1e6:.3f}M "
          f"(the large document); {n_cores} cores, {workers} workers; load average {os.getloadavg()[0]:.1f}")
    print(f"{'format':<10} {'tokens':>10} {'wall s':>7} {'M tok/s':>8} {'ratio':>6} {'steady':>6} {'cores':>6} "
          f"{'main s':>6} {'cpu eff':>7} {'ceiling':>7} {'of it':>6}")
    ratios = []
    for fmt, n, wall, main_cpu, cpu, ceiling in rows:
        base = base_cpu = raw_big_cpu if fmt == "big.txt" else raw_cpu
        rate, steady = n / wall, n / max(1e-9, wall - start)
        ratios.append((fmt, rate / (n_cores * base)))
        print(f"{fmt:<10} {n:>10} {wall:>7.2f} {rate / 1e6:>8.3f} {rate / (n_cores * base):>6.2f} "
              f"{steady / (n_cores * base):>6.2f} {cpu / wall:>6.2f} {main_cpu:>6.2f} "
              f"{n / max(1e-9, cpu - start_cpu) / base_cpu:>7.2f} {ceiling / (n_cores * raw_cpu):>7.2f} "
              f"{rate / ceiling:>6.2f}")
    print(f"ratio = tokens/s / ({n_cores} x raw), goal >= {GOAL}; raw: one process's tokens per CPU-second (its "
          "tokens/s on a core of its own; robust to other load on the machine); steady: the same without the pool's "
          "start-up; "
          "cores: CPU-seconds of all processes / wall (what the machine gave them); main s: the main process's "
          "CPU-seconds; cpu eff: tokens per CPU-second / raw's, start-up left out; ceiling: the machine's own limit "
          f"just before the run, {workers} raw encoders at once (2 MB each), tokens/s / ({n_cores} x raw); of it: "
          "the run's tokens/s / that ceiling's")
    print("ratio " + " ".join(f"{f}={r:.2f}" for f, r in ratios))


if __name__ == "__main__":
    main()
