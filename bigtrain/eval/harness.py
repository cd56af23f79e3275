"""`bigtrain lm-eval`: EleutherAI's lm-evaluation-harness, fully offline, on a bigtrain checkpoint or an HF directory.

    results = lm_eval_run("runs/x", tasks=["bigtrain_mc", "bigtrain_text"], limit=None)

SRC is an exported Hugging Face directory (it has config.json; it must hold the tokenizer files too) or anything
`bigtrain convert to-hf` takes (a run directory: its newest complete checkpoint; a checkpoint directory), which
is exported into a temporary directory first and removed afterwards. lm-eval runs in this process on the `hf`
model with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE set: nothing is downloaded, so every task
must read local files.

Shipped tasks (bigtrain/eval/lm_eval_tasks/): `bigtrain_mc`, 42 four-choice questions (acc, acc_norm), and
`bigtrain_text`, the rolling log-likelihood of about 8 KB of English (word_perplexity, byte_perplexity,
bits_per_byte). lm-eval's `data_files` wants absolute paths, so their YAMLs are templates: @DATA_DIR@ is filled
in with the folder's absolute path into a temporary include folder at run time. Other tasks: `include_path`
(your own YAMLs) or lm-eval's built-in ones when their data is already in the local HF datasets cache.

The result is one JSON-able object: {"source", "checkpoint" (the one exported, or null for an HF directory),
"limit", "tasks": {task: {metric: value, ..., "samples": n}}}.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import math
import os
import sys
import tempfile

from ..errors import BigtrainError

TASK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
SHIPPED = ("bigtrain_mc", "bigtrain_text")
PLACEHOLDER = "@DATA_DIR@"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
NOT_INSTALLED = "lm-eval is not installed: pip install 'bigtrain[eval]'"


def write_task_yamls(dest: str) -> list[str]:
    """The shipped task YAMLs with their data folder's absolute path filled in, written into `dest`."""
    quoted = json.dumps(TASK_DIR)[1:-1]  # the path inside a double-quoted YAML string
    written = []
    for src in sorted(glob.glob(os.path.join(TASK_DIR, "*.yaml"))):
        with open(src, encoding="utf-8") as f:
            text = f.read().replace(PLACEHOLDER, quoted)
        path = os.path.join(dest, os.path.basename(src))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written


@contextlib.contextmanager
def offline_env():
    """HF hub, datasets and transformers offline for the block (set before they are imported)."""
    old = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def export(src: str, dest: str, tokenizer: str | None = None) -> tuple[str, str]:
    """(HF directory, checkpoint) for SRC: itself when it is one, else a fresh export of its checkpoint into `dest`
    (with `tokenizer`, or the run's data.tokenizer)."""
    if is_hf_dir(src):
        return src, ""
    from ..checkpoint import resolve
    from ..convert.hf import to_hf
    checkpoint = resolve(src)
    out = os.path.join(dest, "hf")
    to_hf(checkpoint, out, tokenizer=tokenizer)
    return out, checkpoint


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return None if v == "N/A" else v


def summarize(results: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results: the filter suffix ',none' dropped, non-finite values and
    'N/A' as None, the number of documents evaluated as 'samples' (lm-eval's 'alias', 'name', 'sample_len' left
    out)."""
    out = {}
    n = results.get("n-samples", {})
    for task, metrics in sorted(results.get("results", {}).items()):
        row = {}
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len"):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else key] = _clean(value)
        if task in n:
            row["samples"] = n[task].get("effective", n[task].get("original"))
        out[task] = row
    return out


def _limit(limit):
    if limit is None:
        return None
    if limit <= 0:
        raise BigtrainError(f"--limit {limit}: expected a positive number of documents (or a fraction below 1)")
    return int(limit) if limit >= 1 and float(limit).is_integer() else limit


def lm_eval_run(src: str, tasks=None, limit=None, output: str | None = None, include_path: str | None = None,
                device: str = "cpu", batch_size: int | str = 8, tokenizer: str | None = None) -> dict:
    """Run lm-evaluation-harness offline on SRC; returns (and with `output`, writes) the summary object."""
    tasks = list(tasks or SHIPPED)
    if not os.path.exists(src):
        raise BigtrainError(f"{src}: no such run, checkpoint or Hugging Face directory")
    if include_path is not None and not os.path.isdir(include_path):
        raise BigtrainError(f"--include-path {include_path}: not a directory")
    if importlib.util.find_spec("lm_eval") is None:
        raise BigtrainError(NOT_INSTALLED)
    limit = _limit(limit)
    with offline_env(), tempfile.TemporaryDirectory(prefix="bigtrain-lm-eval-") as tmp:
        task_dir = os.path.join(tmp, "tasks")
        os.makedirs(task_dir)
        write_task_yamls(task_dir)
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager
        except ImportError as e:
            raise BigtrainError(f"{NOT_INSTALLED} ({e})") from None
        manager = TaskManager(include_path=[task_dir] + ([include_path] if include_path else []),
                              include_defaults=not set(tasks) <= set(SHIPPED))
        missing = [t for t in tasks if t not in manager.all_tasks]
        if missing:
            raise BigtrainError(f"unknown lm-eval task{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                f"(shipped: {', '.join(SHIPPED)})")
        hf_dir, checkpoint = export(src, tmp, tokenizer)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
            results = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": hf_dir, "dtype": "float32" if device == "cpu" else "auto"},
                tasks=tasks, task_manager=manager, limit=limit, device=device, batch_size=batch_size,
                log_samples=False, bootstrap_iters=1000)
    summary = {"source": os.path.abspath(src), "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
               "limit": limit, "tasks": summarize(results or {})}
    if output:
        from ..atomic import write_json
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        write_json(output, summary)
    return summary
