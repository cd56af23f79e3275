"""Choosing and loading a checkpoint: the run's newest usable one (torn or corrupt ones skipped; every rank
hashes a share of the files), or `checkpoint.load`, into whatever layout this run has (each rank assembles its
shards from whichever saved pieces overlap them); for a rewind, the newest healthy one before the anomalies;
after the guards gave up, the checkpoints saved while the run was unwell are set aside.

`Restoring` is the restore half of `Checkpointer` (manager.py), which it shares its state with (cfg, engine,
data, maps, layout, rank, world, root, the newest started and committed steps).
"""
from __future__ import annotations

import logging
import os
import shutil

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from ..atomic import atomic_write
from ..model.layout import ParamMap, param_maps
from ..parallel.distributed import on_rank0
from . import state as S
from .store import CheckpointError, Reader, complete, healthy, list_steps, resolve, step_dir_name, validate, verify

log = logging.getLogger("bigtrain")


def read_local(reader: Reader, kind: str, m: ParamMap) -> torch.Tensor:
    """This rank's part of parameter `m`, assembled from whichever saved pieces overlap it."""
    out = torch.empty(m.shape, dtype=torch.float32)
    for pc in m.pieces:
        out[pc.local] = reader.read(kind, m.global_name, pc.offsets, pc.shape)
    return out


def check_shapes(reader: Reader, maps: list[ParamMap]) -> None:
    for m in maps:
        saved = reader.shapes.get(m.global_name)
        if saved != m.full_shape:
            raise CheckpointError(f"{reader.path}: tensor {m.global_name} has shape {list(saved) if saved else 'none'} "
                                  f"in the checkpoint, the model configured here expects {list(m.full_shape)}")


@torch.no_grad()
def load_weights(model: torch.nn.Module, path: str, tied: bool) -> dict:
    """Load a checkpoint's weights into a bare (not DeepSpeed-wrapped) model of any layout; returns its meta."""
    reader = Reader(resolve(path))
    maps = param_maps(model, tied)
    check_shapes(reader, maps)
    for m in maps:
        m.param.copy_(read_local(reader, "model", m))
    reader.close()
    return reader.meta


class Restoring:
    def _candidates(self, before_step: int | None = None, healthy_only: bool = False) -> list[str]:
        """Rank 0: this run's complete checkpoints, newest first (torn ones reported and left out)."""
        out = []
        for path, meta in complete(self.root, lambda p, e: log.warning(
                f"skipping checkpoint {p}: {e}; falling back to the previous one")):
            if before_step is not None and meta["step"] >= before_step:
                continue
            if healthy_only and not healthy(meta):
                log.info(f"not rewinding to {path}: it was saved while the run was unwell ({meta.get('health')})")
                continue
            out.append(path)
        return out

    def _verified(self, path: str) -> str | None:
        """Collective: why `path` cannot be used (a file not matching its checksum), or None. Each rank hashes
        a share of the files."""
        if not self.cfg.checkpoint.verify:
            return None
        try:
            meta = validate(path)
            names = sorted(meta.get("checksums") or {})[self.rank::self.world]
            verify(path, meta, names)
            error = None
        except CheckpointError as e:
            error = str(e)
        errors = [None] * self.world
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)

    def choose(self, before_step: int | None = None, healthy_only: bool = False) -> str | None:
        """Collective: the newest usable checkpoint of this run (optionally: older than `before_step`, healthy)."""
        for path in on_rank0(self._candidates, before_step, healthy_only):
            error = self._verified(path)
            if error is None:
                return path
            if self.rank == 0:
                log.warning(f"skipping checkpoint {path}: {error}; falling back to the previous one")
        return None

    def restore(self, path: str | None = None, resume: bool = True, data: bool = True) -> dict | None:
        """Load a checkpoint into this run; returns its meta (None: nothing to load, a fresh start). Default: the
        run's own newest usable checkpoint (a resume), else `checkpoint.load`. `data=False` keeps the loader
        where it is (a rewind). After a resume `meta['step']` is the step to continue at."""
        if path is None:
            path = self.choose()
            if path is None and self.cfg.checkpoint.load:
                path, resume = on_rank0(resolve, self.cfg.checkpoint.load, False), self.cfg.checkpoint.load_optimizer
                error = self._verified(path)
                if error:
                    raise CheckpointError(f"checkpoint.load: {error}")
            if path is None:
                return None
        reader = Reader(path)
        meta = reader.meta
        check_shapes(reader, self.maps)
        for m in self.maps:
            S.set_weights(self.engine, m, read_local(reader, "model", m))
        step = 0
        if resume:
            step = meta["step"]
            if meta.get("optimizer_step") is not None:
                S.init_moments(self.engine)
                for m in self.maps:
                    S.set_moments(self.engine, m, {k: read_local(reader, k, m) for k in S.MOMENTS})
                S.set_optimizer_step(self.engine, meta["optimizer_step"])
            if data and meta.get("data") is not None:
                self.data.load_state_dict(meta["data"])
            self._restore_rng(path, meta)
        reader.close()
        self._started = self._committed = step if resume else None
        log.info(f"restored {path} (saved on layout {meta['layout']}): "
                 + (f"resuming at step {step}" if resume else "weights only, starting at step 0"))
        return {**meta, "step": step, "path": path, "resumed": resume}

    def _restore_rng(self, path: str, meta: dict) -> None:
        if meta["layout"] != self.layout:
            # per-rank RNG streams don't carry over to another layout (dropout masks are layout-dependent anyway):
            # start fresh ones from (seed, step) rather than repeat the streams of step 0
            seed = self.cfg.train.seed + 1_000_003 * meta["step"]
            torch.manual_seed(seed)
            tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
            log.info(f"different parallel layout: RNG streams re-seeded from train.seed and step {meta['step']}")
            return
        from safetensors.torch import load_file
        rng = load_file(os.path.join(path, f"rng-{self.rank:05d}.safetensors"))
        torch.set_rng_state(rng.pop("cpu"))
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng.pop("cuda"))
        tensor_parallel.get_cuda_rng_tracker().set_states({k.split("/", 1)[1]: v for k, v in rng.items()})

    def discard_after(self, step: int) -> None:
        """Collective: delete this run's checkpoints newer than `step` (a rewind abandons them)."""
        self.sync()
        if self.rank == 0:
            for s in list_steps(self.root):
                if s > step:
                    log.warning(f"rewind: deleting {step_dir_name(s)} (saved after the rewind target)")
                    shutil.rmtree(os.path.join(self.root, step_dir_name(s)), ignore_errors=True)
            with atomic_write(os.path.join(self.root, "latest")) as f:
                f.write(step_dir_name(step) + "\n")
        dist.barrier()
        self._started = self._committed = step

    def set_aside_unhealthy(self, before_step: int) -> str | None:
        """Collective: move this run's checkpoints newer than its newest healthy one older than `before_step` into
        checkpoints/unhealthy/ (kept for inspection, out of a resume's way); returns the name of the one kept
        (None: there is none, and nothing is moved)."""
        self.sync()
        kept = on_rank0(self._set_aside_unhealthy, before_step)
        dist.barrier()
        return kept

    def _set_aside_unhealthy(self, before_step: int) -> str | None:
        good = next((p for p, meta in complete(self.root) if healthy(meta) and meta["step"] < before_step), None)
        if good is None:
            return None
        newest = int(os.path.basename(good).split("-")[1])
        aside = os.path.join(self.root, "unhealthy")
        for s in list_steps(self.root):
            if s > newest:
                os.makedirs(aside, exist_ok=True)
                dest = os.path.join(aside, step_dir_name(s))
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(os.path.join(self.root, step_dir_name(s)), dest)
                log.warning(f"moved {step_dir_name(s)} to {aside}: saved after the run went bad")
        with atomic_write(os.path.join(self.root, "latest")) as f:
            f.write(os.path.basename(good) + "\n")
        return os.path.basename(good)
