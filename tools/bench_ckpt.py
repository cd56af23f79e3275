"""Checkpoint benchmark: how long a save stalls training, how fast the background write goes, what the integrity
checks cost, and how long a restore takes with and without checksum verification.

Builds a Llama-shaped model through the real stack (megatron-core model, DeepSpeed engine, the real data
loader over freshly written shards), trains one step so AdamW state exists, then saves --saves times through
bigtrain's Checkpointer and reports, per save, the stall (the time `save()` blocks the training loop: the
host snapshot), the background write rate and, inside it, the time of the non-finite check and of hashing
(xxh3-128). Then it restores the newest checkpoint --restores times each with `checkpoint.verify` on and off.
Runs as one process or under torchrun.

    python tools/bench_ckpt.py                                   # CPU: ~85M parameters, fp32
    python tools/bench_ckpt.py --preset tinyllama-1.1b           # GPU: TinyLlama 1.1B shape, bf16
Last lines: checks_share_of_write=<(check+hash)/write> restore_verify_ratio=<restore with / without verify>
            stall_s=<median> write_GBps=<median> bytes=<per save, all ranks> params=<N>
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, vocab=512, seq=32, precision="fp32"),  # smoke test
    "cpu-85m": dict(hidden=768, layers=8, heads=12, kv=4, vocab=32000, seq=128, precision="fp32"),
    "tinyllama-1.1b": dict(hidden=2048, layers=22, heads=32, kv=4, vocab=32000, seq=2048, precision="bf16"),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tinyllama-1.1b" if torch.cuda.is_available() else "cpu-85m", choices=PRESETS)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--restores", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where shards and checkpoints go (default: a temp dir)")
    p.add_argument("overrides", nargs="*", help="extra bigtrain config overrides")
    a = p.parse_args()
    s = PRESETS[a.preset]

    from bigtrain.checkpoint import Checkpointer
    from bigtrain.config import load_config
    from bigtrain.data import build_train_source
    from bigtrain.data.shards import ShardWriter
    from bigtrain.model import build_model
    from bigtrain.parallel import build_engine, init_model_parallel, setup, train_step
    from bigtrain.train.metrics import num_params
    from megatron.core import parallel_state as ps

    env, device = setup()
    import torch.distributed as dist
    box = [a.workdir or (tempfile.mkdtemp(prefix="bench-ckpt-") if env.rank == 0 else None)]
    dist.broadcast_object_list(box)  # one work directory for every rank (under torchrun too)
    work = box[0]
    shards = os.path.join(work, "shards")
    if env.rank == 0 and not os.path.exists(os.path.join(shards, "manifest.json")):
        w = ShardWriter(shards, s["seq"], s["vocab"], samples_per_member=16, shard_samples=64)
        w.add(np.random.default_rng(0).integers(0, s["vocab"], 64 * 8 * (s["seq"] + 1)), 1)
        w.close()
    torch.distributed.barrier()
    cfg = load_config(None, [
        f"run.dir={work}/run", f"model.vocab_size={s['vocab']}", f"model.hidden_size={s['hidden']}",
        f"model.num_layers={s['layers']}", f"model.num_attention_heads={s['heads']}", f"model.num_kv_heads={s['kv']}",
        f"model.seq_length={s['seq']}", f"train.precision={s['precision']}", "train.micro_batch_size=1",
        f"train.global_batch_size={env.world}", f"parallel.zero_stage={a.zero}", f"data.sources=[{{path: {shards}}}]",
        "data.lanes=8", *a.overrides])
    init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed)
    engine = build_engine(build_model(cfg), cfg)
    data = build_train_source(cfg, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    ckpt = Checkpointer(cfg, engine, data)
    train_step(engine, data.next_batch().to(device), cfg)
    for i in range(a.saves):
        ckpt.save(i + 1, reason="bench")
        ckpt.sync()  # training goes on meanwhile; saves are minutes apart, so each finds the last one done
    restore = {True: [], False: []}
    for _ in range(a.restores):
        for check in (True, False):  # interleaved, so that the page cache treats both alike
            cfg.checkpoint.verify = check
            torch.distributed.barrier()
            t0 = time.perf_counter()
            ckpt.restore()
            restore[check].append(time.perf_counter() - t0)
    if env.rank == 0:
        n = num_params(cfg)
        stats = ckpt.stats
        for st in stats:
            print(f"save {st['step']}: stall {st['stall_s']:.3f} s, rank-0 bytes {st['bytes'] / 1e9:.3f} GB, "
                  f"background write {st['write_s']:.2f} s ({st['bytes'] / st['write_s'] / 1e9:.2f} GB/s per rank), "
                  f"of which non-finite check {st['check_s']:.3f} s, hashing {st['hash_s']:.3f} s")
        checks = statistics.median((st["check_s"] + st["hash_s"]) / st["write_s"] for st in stats)
        with_v, without = statistics.median(restore[True]), statistics.median(restore[False])
        print(f"restore: {with_v:.3f} s with checksum verification, {without:.3f} s without (median of "
              f"{a.restores})")
        print(f"checks_share_of_write={checks:.3f} restore_verify_ratio={with_v / without:.3f}")
        from bigtrain.checkpoint import resolve, validate
        total = sum(validate(resolve(os.path.join(work, "run")))["files"].values())
        print(f"device={device.type} ranks={env.world} preset={a.preset} zero={a.zero} params={n / 1e6:.1f}M")
        print(f"stall_s={statistics.median(st['stall_s'] for st in stats):.3f} "
              f"write_GBps={statistics.median(st['bytes'] / st['write_s'] for st in stats) / 1e9:.2f} "
              f"bytes={total} params={n}")


if __name__ == "__main__":
    main()
