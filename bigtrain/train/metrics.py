"""What a run reports: each optimizer step's record (loss, lr, gradient norm, throughput, TFLOP/s, MFU, memory,
skipped steps, evaluation results) and the run's events (starts, resumes, checkpoints, skipped steps, spikes,
rewinds, requeues), sent to the sinks of sinks.py: `metrics.jsonl`, `events.jsonl`, TensorBoard, the console.
Only rank 0 writes; the other ranks get a logger that does nothing.
"""
from __future__ import annotations

import logging
import os
import resource
import time

import torch

from ..config import Config
from ..parallel.plan import param_count

log = logging.getLogger("bigtrain")


def setup_logging(rank: int) -> None:
    """The `bigtrain` logger prints to stderr (INFO on rank 0, warnings and errors on the others)."""
    handler = next((h for h in log.handlers if getattr(h, "bigtrain", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.bigtrain = True
        log.addHandler(handler)
    handler.setFormatter(logging.Formatter(f"[bigtrain %(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S"))
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def num_params(cfg: Config) -> int:
    """Parameters of the whole (unsharded) model, padded vocabulary included (what the engine holds)."""
    return param_count(cfg.model, padded=True)


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: 6N for the matmuls of forward+backward plus 12*L*d*S for attention
    (the convention of the GPU benchmark's peer, so MFU figures compare)."""
    m = cfg.model
    return 6 * num_params(cfg) + 12 * m.num_layers * m.hidden_size * m.seq_length


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


class Metrics:
    """Rank 0 sends each optimizer step's record and each event to the sinks (sinks.py); other ranks send
    nothing. A sink that fails (a full disk under TensorBoard's writer thread, say) is closed and not called
    again, and `failure` names it: the loop stops the run with that error at the next step boundary, on every
    rank (a run whose metrics can no longer be written is not left running blind)."""

    def __init__(self, cfg: Config, rank: int, world: int, sinks: list | None = None):
        self.cfg, self.world = cfg, world
        self.enabled = rank == 0
        self.flops_per_token = flops_per_token(cfg)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        self.failure: str | None = None
        self.sinks = [] if not self.enabled else sinks if sinks is not None else default_sinks(cfg)

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            if not hasattr(sink, method):
                continue
            try:
                getattr(sink, method)(*args)
            except Exception as e:
                self.sinks.remove(sink)
                self.failure = self.failure or f"writing {sink.name} failed ({type(e).__name__}: {e})"
                log.error(f"metrics: {self.failure}")
                try:
                    sink.close()
                except Exception:
                    pass

    def open(self, start_step: int) -> None:
        if self.enabled:
            os.makedirs(self.cfg.run.dir, exist_ok=True)
            self._each("open", self.cfg.run.dir, start_step)

    def step(self, record: dict) -> dict:
        """The step's record with throughput, FLOP/s, MFU and memory added, written to every sink."""
        seconds = record["step_seconds"]
        tokens_per_s = self.tokens_per_step / seconds
        tflops = tokens_per_s * self.flops_per_token / self.world / 1e12
        rec = {k: v for k, v in record.items() if k != "applied" and not k.startswith("_")}
        rec.update(tokens_per_s=tokens_per_s, tflops_per_device=tflops, mfu=tflops / self.cfg.train.peak_tflops,
                   mem_gib=peak_memory_gib())
        if self.enabled:
            self._each("write", rec)
        return rec

    def scalar(self, name: str, value: float, step: int) -> None:
        """A scalar outside the step records (TensorBoard only), e.g. run/restarts."""
        if self.enabled:
            self._each("scalar", name, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """A text outside the step records (TensorBoard only), e.g. the in-loop samples `samples/<i>`."""
        if self.enabled:
            self._each("text", tag, text, step)

    def event(self, kind: str, step: int, **fields) -> None:
        """A run event (start, resume, checkpoint, skipped_step, spike, rewind, requeue...)."""
        if self.enabled:
            self._each("event", dict(event=kind, step=step, time=time.time(), **fields))

    def rewind(self, step: int) -> None:
        if self.enabled:
            self._each("rewind", step)

    def close(self) -> None:
        if self.enabled:
            self._each("close")
            self.sinks = []


def default_sinks(cfg: Config) -> list:
    from .sinks import ConsoleSink, JsonlSink, TensorBoardSink
    sinks = [JsonlSink()]
    try:
        import torch.utils.tensorboard  # noqa: F401
        sinks.append(TensorBoardSink())
    except ImportError:  # tensorboard is an install requirement; keep training if it was removed
        log.warning("tensorboard is not installed: no TensorBoard events")
    return sinks + [ConsoleSink(cfg.train.steps, cfg.train.log_interval)]
