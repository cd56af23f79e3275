"""The training loop, top to bottom.

    set up processes -> build model (megatron-core) -> wrap in DeepSpeed -> data -> restore checkpoint
    -> for each step: lr, batch, forward/backward/step, metrics, evaluation, checkpoint, stop request
    -> final checkpoint
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..checkpoint import Checkpointer
from ..config import Config, dump
from ..data import build_train_source, build_validation_source, check_manifest
from ..data.corpus import prepare as prepare_corpus
from ..launch.preemption import StopRequest, check_restarts, restart_count
from ..model import build_model
from ..parallel import build_engine, check_layout, forward_backward, init_model_parallel, setup, train_step
from ..parallel.distributed import on_rank0
from .metrics import Metrics, setup_logging

log = logging.getLogger("bigtrain")


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for the optimizer step with 0-based index `step`: linear warmup, cosine decay to min_lr."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay = t.decay_steps or max(t.steps - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / decay, 1.0)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def evaluate(engine, valid, cfg: Config) -> float:
    """Mean token loss over `train.eval_batches` global batches from the start of the validation data."""
    engine.eval()
    with torch.no_grad():
        losses = [forward_backward(engine, batch.to(engine.device), cfg, forward_only=True)
                  for batch in valid.batches(cfg.train.eval_batches)]
    engine.train()
    return sum(losses) / len(losses)


@dataclass
class TrainResult:
    history: list[dict]   # per-step metrics of the steps this process trained
    step: int             # the step the run is at
    stopped: str = ""     # the signal that stopped it before train.steps ("" = it ran to the end)


def train(cfg: Config) -> TrainResult:
    """Train (or resume) the run described by `cfg`."""
    check_restarts(cfg.launch.max_requeues)
    stop = StopRequest()  # from here on a stop signal is acted on at the first step boundary
    try:
        return _train(cfg, stop)
    finally:
        stop.restore_handlers()


def _train(cfg: Config, stop: StopRequest) -> TrainResult:
    env, device = setup(cfg.parallel.backend, cfg.parallel.timeout_minutes)
    setup_logging(env.rank)
    check_layout(cfg, env.world)
    if cfg.data.prepare:
        on_rank0(prepare_corpus, cfg)
    check_manifest(cfg)
    init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    if env.rank == 0:
        os.makedirs(cfg.run.dir, exist_ok=True)
        dump(cfg, os.path.join(cfg.run.dir, "config.yaml"))
    log.info(f"run {cfg.run.name or os.path.basename(os.path.abspath(cfg.run.dir))}: "
             f"{env.world} ranks ({env.launcher}, {device.type}): TP={cfg.parallel.tensor} PP={cfg.parallel.pipeline} "
             f"DP={ps.get_data_parallel_world_size()} ZeRO-{cfg.parallel.zero_stage} {cfg.train.precision}")

    engine = build_engine(build_model(cfg), cfg)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    data = build_train_source(cfg, dp_rank, dp_size)
    valid = build_validation_source(cfg, dp_rank, dp_size)
    metrics = None
    try:
        ckpt = Checkpointer(cfg, engine, data)
        step = ckpt.restore()
        metrics = Metrics(cfg, env.rank, env.world, step)
        metrics.event("resume" if step else "start", step, world=env.world, launcher=env.launcher,
                      restart=restart_count())
        metrics.scalar("run/restarts", restart_count(), step)
        history = []

        while step < cfg.train.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            set_lr(engine, lr)
            batch = data.next_batch().to(device, non_blocking=True)
            loss, grad_norm = train_step(engine, batch, cfg)
            step += 1
            seconds = time.perf_counter() - t0
            stopping = step < cfg.train.steps and stop.requested()  # at the last step the run is done anyway
            extra = {}
            if valid is not None and cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and not stopping:
                extra["val_loss"] = evaluate(engine, valid, cfg)
                metrics.scalar("val/loss", extra["val_loss"], step)
            history.append(metrics.step(step, loss, lr, grad_norm, seconds, **extra))
            if stopping:
                metrics.event("stopped", step, reason=stop.reason, checkpoint_stall_s=ckpt.save(step, stop.reason))
                break
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                metrics.event("checkpoint", step, stall_s=ckpt.save(step, "interval"))

        stall = ckpt.finish(step)  # the checkpoint of `step` is committed past this line (saved again if it failed)
        if stall is not None:
            metrics.event("checkpoint", step, stall_s=stall)
        if stop.reason:
            metrics.event("requeue", step, action=stop.requeue(cfg.launch.max_requeues), restart=restart_count())
    finally:
        data.close()
        if metrics is not None:
            metrics.close()
    dist.barrier()
    return TrainResult(history, step, stop.reason)
