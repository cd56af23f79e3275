"""GPU training benchmark: bigtrain's full stack against the plain-PyTorch peer, in the same session.

bigtrain side: the megatron-core GPT inside a DeepSpeed engine, fed by bigtrain's data loader from real
WebDataset shards (random token ids, written here), through the same `train_step` as `bigtrain train`.
Peer side: tools/peer_llama.py (a copy of shared/bench/peer_llama.py: plain PyTorch, SDPA, fused AdamW,
torch.compile), run as a subprocess on the same GPU afterwards.

MFU = tokens/s x (6N + 12 L d S) / peak, N = all parameters (the peer's formula and peak, 989 TFLOP/s).

    python tools/bench.py                               # GPU: TinyLlama-1.1B shape, seq 2048, bf16, ZeRO-1
    python tools/bench.py --workload tiny --steps 3     # CPU smoke test (the peer needs CUDA: not run)
Last line: bigtrain_mfu=<M> peer_mfu=<P> ratio=<R> (peer values "n/a" when the peer did not run)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

WORKLOADS = {
    # the workload: TinyLlama-1.1B shape on one H100
    "tinyllama-1.1b": dict(layers=22, hidden=2048, ffn=5632, heads=32, kv=4, vocab=32000, seq=2048, mbs=4,
                           precision="bf16", peer_mbs=16),
    # CPU smoke test
    "tiny": dict(layers=2, hidden=128, ffn=384, heads=4, kv=2, vocab=1024, seq=128, mbs=2, precision="fp32",
                 peer_mbs=2),
}


def bigtrain_run(w: dict, steps: int, warmup: int, work: str, overrides: list[str]) -> dict:
    from bigtrain.config import load_config
    from bigtrain.data import build_train_source
    from bigtrain.data.shards import ShardWriter
    from bigtrain.model import build_model
    from bigtrain.parallel import build_engine, init_model_parallel, setup, train_step
    from bigtrain.train.lr import lr_at, set_lr
    from bigtrain.train.metrics import flops_per_token, num_params, peak_memory_gib
    from megatron.core import parallel_state as ps

    env, device = setup()
    shards = os.path.join(work, "shards")
    samples = w["mbs"] * env.world * (steps + warmup) + 256
    if env.rank == 0:
        writer = ShardWriter(shards, w["seq"], w["vocab"], samples_per_member=16, shard_samples=max(16, samples // 16))
        writer.add(np.random.default_rng(0).integers(0, w["vocab"], samples * (w["seq"] + 1)), 1)
        writer.close()
    torch.distributed.barrier()
    cfg = load_config(None, [
        f"run.dir={work}/run", f"model.vocab_size={w['vocab']}", f"model.hidden_size={w['hidden']}",
        f"model.num_layers={w['layers']}", f"model.num_attention_heads={w['heads']}", f"model.num_kv_heads={w['kv']}",
        f"model.ffn_hidden_size={w['ffn']}", f"model.seq_length={w['seq']}", f"train.precision={w['precision']}",
        f"train.micro_batch_size={w['mbs']}", f"train.global_batch_size={w['mbs'] * env.world}", "train.lr=1e-4",
        f"train.steps={steps + warmup}", "parallel.zero_stage=1", f"data.sources=[{{path: {shards}}}]",
        *overrides])
    init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed)
    engine = build_engine(build_model(cfg), cfg)
    data = build_train_source(cfg, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    times = []
    for step in range(steps + warmup):
        set_lr(engine, lr_at(step, cfg))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = train_step(engine, data.next_batch().to(device, non_blocking=True), cfg)  # .item() syncs
        times.append(time.perf_counter() - t0)
    data.close()
    step_s = statistics.median(times[warmup:])
    tok_s = cfg.train.global_batch_size * cfg.model.seq_length / step_s
    tflops = tok_s * flops_per_token(cfg) / env.world / 1e12
    return dict(system="bigtrain", params=num_params(cfg), mbs=w["mbs"], seq=w["seq"], step_s=round(step_s, 4),
                tokens_per_s=round(tok_s), tflops=round(tflops, 1), mfu=round(tflops / cfg.train.peak_tflops, 4),
                peak_mem_gib=round(peak_memory_gib(), 1), loss=loss, rank=env.rank,
                layout=f"TP{cfg.parallel.tensor} PP{cfg.parallel.pipeline} ZeRO-{cfg.parallel.zero_stage} {w['precision']}")


def peer_run(w: dict, steps: int, warmup: int) -> dict | None:
    if not torch.cuda.is_available():
        return None
    cmd = [sys.executable, os.path.join(HERE, "peer_llama.py"), "--mbs", str(w["peer_mbs"]), "--seq", str(w["seq"]),
           "--layers", str(w["layers"]), "--hidden", str(w["hidden"]), "--ffn", str(w["ffn"]), "--heads", str(w["heads"]),
           "--kv", str(w["kv"]), "--vocab", str(w["vocab"]), "--steps", str(steps), "--warmup", str(warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"peer failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="tinyllama-1.1b" if torch.cuda.is_available() else "tiny", choices=WORKLOADS)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mbs", type=int, default=None, help="bigtrain micro-batch size (default: the workload's)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("overrides", nargs="*", help="bigtrain config overrides, e.g. parallel.activation_checkpointing=selective")
    a = p.parse_args()
    w = dict(WORKLOADS[a.workload])
    if a.mbs:
        w["mbs"] = a.mbs
    ours = bigtrain_run(w, a.steps, a.warmup, tempfile.mkdtemp(prefix="bench-"), a.overrides)
    if ours["rank"] != 0:
        return
    torch.distributed.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print("RESULT", json.dumps(ours), flush=True)
    peer = None if a.no_peer else peer_run(w, a.steps, a.warmup)
    if peer:
        print("RESULT", json.dumps(peer), flush=True)
    print(f"{'system':<30} {'mbs':>4} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>7} {'peak GiB':>9}")
    for r in filter(None, [ours, peer]):
        print(f"{r['system'] + (' ' + r['layout'] if 'layout' in r else ''):<30} {r['mbs']:>4} {r['tokens_per_s']:>10,} "
              f"{r['tflops']:>8} {100 * r['mfu']:>6.1f}% {r['peak_mem_gib']:>9}")
    peer_mfu = f"{peer['mfu']:.4f}" if peer else "n/a"
    ratio = f"{ours['tokens_per_s'] / peer['tokens_per_s']:.3f}" if peer else "n/a"
    print(f"bigtrain_mfu={ours['mfu']:.4f} peer_mfu={peer_mfu} ratio={ratio}")


if __name__ == "__main__":
    main()
