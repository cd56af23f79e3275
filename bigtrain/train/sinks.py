"""Where a run's metrics go: sinks behind one interface (rank 0 only; see metrics.py for who calls them).

    sink.open(run_dir, start_step)   before the first step (after a resume: records past start_step are dropped)
    sink.write(record)               one optimizer step's metrics: {"step": N, "loss": ..., ...}
    sink.event(event)                a run event: {"event": kind, "step": N, "time": t, ...}
    sink.rewind(step)                the run went back to `step`: forget what came after it
    sink.close()

`JsonlSink` writes metrics.jsonl (one object per step) and events.jsonl, `TensorBoardSink` the tensorboard/
directory, `ConsoleSink` a line per `train.log_interval` steps and each event to the `bigtrain` logger.
Record keys without a '/' are TensorBoard tags `train/<key>`; keys with one (`val/...`) are tags as they are.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading

from ..atomic import atomic_write

log = logging.getLogger("bigtrain")

NOT_SCALARS = ("step", "batch")
TB_TAGS = {"val_loss": "val/loss"}


class Sink:
    name = "sink"

    def open(self, run_dir: str, start_step: int) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def event(self, event: dict) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records of steps after `last_step`: after a crash the steps since the last checkpoint are trained
    again, and metrics.jsonl keeps exactly one record per step."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a killed writer
    if len(keep) != len(lines):
        with atomic_write(path) as f:
            f.writelines(keep)


class JsonlSink(Sink):
    name = "metrics.jsonl"

    def open(self, run_dir, start_step):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        truncate_jsonl(self.path, start_step)
        self.metrics = open(self.path, "a")
        self.events = open(os.path.join(run_dir, "events.jsonl"), "a")

    def write(self, record):
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def event(self, event):
        self.events.write(json.dumps(event) + "\n")
        self.events.flush()

    def rewind(self, step):
        self.metrics.close()
        truncate_jsonl(self.path, step)
        self.metrics = open(self.path, "a")

    def close(self):
        for f in (getattr(self, "metrics", None), getattr(self, "events", None)):
            if f is not None:
                f.close()


class TensorBoardSink(Sink):
    name = "tensorboard"

    def open(self, run_dir, start_step):
        self.dir = os.path.join(run_dir, "tensorboard")
        self._open(start_step)

    def _open(self, start_step):
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(self.dir, purge_step=start_step + 1 if start_step else None)

    def write(self, record):
        step = record["step"]
        for k, v in record.items():
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.tb.add_scalar(TB_TAGS.get(k, k if "/" in k else f"train/{k}"), v, step)

    def scalar(self, tag, value, step):
        self.tb.add_scalar(tag, value, step)

    def text(self, tag, text, step):
        self.tb.add_text(tag, text, step)

    def event(self, event):
        self.tb.add_text("events", json.dumps(event), event["step"])

    def rewind(self, step):
        self.tb.close()
        self._open(step)

    def close(self):
        tb = getattr(self, "tb", None)
        if tb is None:
            return
        # the writer's own thread may be dead (a full disk): close it aside, never wait long for it
        t = threading.Thread(target=_quiet_close, args=(tb,), daemon=True)
        t.start()
        t.join(timeout=10)


def _quiet_close(tb) -> None:
    try:
        tb.close()
    except Exception:  # already reported by the failing write
        pass


class ConsoleSink(Sink):
    name = "console"

    def __init__(self, steps: int, log_interval: int):
        self.steps, self.interval = steps, log_interval

    def write(self, r):
        step = r["step"]
        if not (step % self.interval == 0 or step == self.steps or "val_loss" in r):
            return
        line = (f"step {step}/{self.steps} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | gnorm {r['grad_norm']:.3f} | "
                f"{r['tokens_per_s']:,.0f} tok/s | {r['tflops_per_device']:.1f} TFLOP/s/dev | MFU {100 * r['mfu']:.1f}% | "
                f"mem {r['mem_gib']:.2f} GiB | {r['step_seconds']:.2f} s")
        if r.get("skipped_steps"):
            line += f" | skipped {r['skipped_steps']}"
        sets = [k for k in r if k.startswith("val/") and k.endswith("/loss")]
        extra = [f"val {k[4:-5]} {r[k]:.4f}" for k in sets] if len(sets) > 1 else \
                [f"validation loss {r['val_loss']:.4f}"] if "val_loss" in r else []
        log.info(line + "".join(f" | {e}" for e in extra))

    def event(self, event):
        fields = {k: v for k, v in event.items() if k not in ("event", "step", "time")}
        log.info(f"{event['event']} at step {event['step']}" + "".join(
            f" {k}={v:.3g}" if isinstance(v, float) else f" {k}={v}" for k, v in fields.items()))
