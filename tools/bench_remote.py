"""Remote shard throughput: the loader reading the same shards from a local directory, an HTTP server and an S3
server, all on 127.0.0.1, in one run.

Writes random token ids as bigtrain shards (seq 2048, 64 samples per member) in --workdir (default a temporary
directory), serves that directory with `python -m http.server` and uploads it to moto's S3 server
(`python -m moto.server`), each in a process of its own (so they do not share the reader's GIL), then reads one
epoch each way through `build_train_source` (num_workers=0, int64 batches, directory sources `DIR`,
`http://127.0.0.1:PORT/` and `s3://bench/shards/`) and prints tokens/s. Loopback has no latency or bandwidth
limit: the figures are the cost per byte of the client stack (urllib3 / boto3) and the servers against plain
file reads, an upper bound for a real network.

    python tools/bench_remote.py [--tokens 64e6] [--seq-len 2048] [--workdir DIR]

Last line: local_tokens_per_s=<L> http_tokens_per_s=<H> s3_tokens_per_s=<S> http_ratio=<H/L> s3_ratio=<S/L>
"""
import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bigtrain.config.schema import Config, DataSource  # noqa: E402
from bigtrain.data import build_train_source  # noqa: E402
from bigtrain.data.shards import ShardWriter  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], port: int):
    """A server process, up once its port accepts connections."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None:
                raise SystemExit(f"{' '.join(cmd)} exited with status {proc.returncode}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def epoch(path: str, seq_len: int, batch: int, samples: int) -> float:
    """Tokens/s of one epoch of `path` through the loader (the first shard opens included)."""
    cfg = Config()
    cfg.data.sources = [DataSource(path=path)]
    cfg.model.seq_length, cfg.model.vocab_size, cfg.train.global_batch_size = seq_len, 32000, batch
    src = build_train_source(cfg, 0, 1)
    steps = samples // batch
    t = time.perf_counter()
    for _ in range(steps):
        b = src.next_batch()
    dt = time.perf_counter() - t
    src.close()
    assert tuple(b.shape) == (batch, seq_len + 1)
    ids = steps * batch * (seq_len + 1)
    print(f"{path:<48} {ids / 1e6:8.1f}M ids in {dt:6.2f}s = {ids / dt / 1e6:8.1f}M tokens/s", flush=True)
    return ids / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=64e6, help="token ids written")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64, help="global batch (samples) per loader step")
    ap.add_argument("--shard-samples", type=int, default=1024)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.workdir) as work:
        d = os.path.join(work, "shards")
        n = int(a.tokens) // (a.seq_len + 1)
        w = ShardWriter(d, a.seq_len, 32000, samples_per_member=64, shard_samples=a.shard_samples)
        w.add(np.random.default_rng(0).integers(0, 32000, n * (a.seq_len + 1), dtype=np.uint16))
        m = w.close()
        print(f"wrote {len(m['shards'])} shards, {n} samples x {a.seq_len + 1} ids ({work})", flush=True)
        hport, sport = free_port(), free_port()
        with server([sys.executable, "-m", "http.server", str(hport), "--bind", "127.0.0.1", "--directory", d],
                    hport) as http, \
                server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(sport)], sport) as s3:
            os.environ.update(AWS_ENDPOINT_URL=s3, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1")
            import boto3
            client = boto3.client("s3")
            client.create_bucket(Bucket="bench")
            for f in sorted(os.listdir(d)):
                client.upload_file(os.path.join(d, f), "bench", f"shards/{f}")
            epoch(d, a.seq_len, a.batch, n)  # warm the page cache and imports alike for every reader
            local = epoch(d, a.seq_len, a.batch, n)
            h = epoch(f"{http}/", a.seq_len, a.batch, n)
            s = epoch("s3://bench/shards/", a.seq_len, a.batch, n)
    print(f"local_tokens_per_s={local:.0f} http_tokens_per_s={h:.0f} s3_tokens_per_s={s:.0f} "
          f"http_ratio={h / local:.3f} s3_ratio={s / local:.3f}")


if __name__ == "__main__":
    main()
