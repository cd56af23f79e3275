"""Saving and restoring runs: atomic, asynchronous, resharding on load.

save(step): every rank snapshots what it owns (fp32 master weights and AdamW moments of its parameters,
DP-deduplicated; its RNG states) into host memory -- the only time training waits -- and a background
thread writes it into `checkpoints/.tmp-step-N/`. A second thread on rank 0 waits until every rank's
index file is there, writes meta.json and renames the directory to `step-N` (the commit), then rewrites
`latest` and deletes checkpoints beyond `checkpoint.keep`. A crash at any moment leaves either the previous
checkpoints or the new complete one. The next save (or the end of the run) confirms the outcome on every
rank with one all-reduce; an I/O error (a full disk) on any rank abandons the new checkpoint and says so,
and the end of the run saves its last step again if that save was lost.

restore(): the newest complete checkpoint of the run directory (skipping torn ones, with a message),
else `checkpoint.load`, loaded into whatever layout this run has.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import threading
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from safetensors.torch import save_file

from ..config import Config, to_dict
from ..model.layout import ParamMap, param_maps
from ..parallel.distributed import on_rank0
from . import state as S
from .store import (FORMAT, CheckpointError, Reader, fsync_dir, fsync_file, list_steps, newest_complete, resolve,
                    step_dir_name, validate, write_json)

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


class Checkpointer:
    def __init__(self, cfg: Config, engine, data):
        self.cfg, self.engine, self.data = cfg, engine, data
        self.root = os.path.join(cfg.run.dir, "checkpoints")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.maps: list[ParamMap] = param_maps(engine.module, cfg.model.tie_embeddings)
        self.layout = dict(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline, data=self.dp_size,
                           world=self.world, zero_stage=cfg.parallel.zero_stage)
        self._latest: int | None = None      # step of the newest save started
        self._committed: int | None = None   # step of the newest save known to be committed
        self._writer: threading.Thread | None = None
        self._committer: threading.Thread | None = None
        self._abort = threading.Event()
        self._error: str | None = None       # this rank's write failure
        self._commit_error: str | None = None
        self._pinned: dict[str, torch.Tensor] = {}
        self.stats: list[dict] = []  # per save: stall seconds, bytes written, write seconds (tools/bench_ckpt.py)
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for stale in glob.glob(os.path.join(self.root, ".tmp-step-*")):
                log.warning(f"removing {stale}: a checkpoint whose save never completed")
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()

    # --- restore ---------------------------------------------------------------------------------------

    def _choose(self) -> tuple[str | None, bool]:
        """(checkpoint to load, whether to resume from it): the run's own newest complete one, else checkpoint.load."""
        own = newest_complete(self.root, lambda path, e: log.warning(
            f"skipping checkpoint {path}: {e}; falling back to the previous one"))
        if own:
            return own, True
        if self.cfg.checkpoint.load:
            return resolve(self.cfg.checkpoint.load), self.cfg.checkpoint.load_optimizer
        return None, False

    def restore(self) -> int:
        """Load the checkpoint to continue from; returns the step to continue at (0 = fresh start)."""
        path, resume = on_rank0(self._choose)
        if path is None:
            return 0
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
            if meta.get("data") is not None:
                self.data.load_state_dict(meta["data"])
            self._restore_rng(path, meta)
        reader.close()
        self._latest = self._committed = step if resume else None
        log.info(f"restored {path} (saved on layout {meta['layout']}): "
                 + (f"resuming at step {step}" if resume else "weights only, starting at step 0"))
        return step

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

    # --- save --------------------------------------------------------------------------------------------

    def save(self, step: int, reason: str) -> float:
        """Snapshot now, write in the background (or now, with checkpoint.async_save=false). Collective.
        Returns how long training waited (seconds), the previous save's unfinished write included."""
        if step == self._latest:
            return 0.0
        t0 = time.perf_counter()
        self.sync()
        with_moments = S.optimizer_step(self.engine) is not None
        if with_moments:
            S.link_moments(self.engine)
        tensors, pieces, shapes = {}, [], {}
        fname = f"rank-{self.rank:05d}.safetensors"
        for j, m in enumerate(self.maps):
            full, fresh = S.full_tensors(self.engine, m, with_moments)  # collective over DP under ZeRO
            if not (m.owner and j % self.dp_size == self.dp_rank):
                continue
            shapes[m.global_name] = list(m.full_shape)
            for kind, t in full.items():
                for i, pc in enumerate(m.pieces):
                    key = f"{kind}/{m.global_name}/{i}"
                    tensors[key] = self._to_host(key, t[pc.local], fresh)
                    pieces.append(dict(kind=kind, name=m.global_name, key=key, file=fname,
                                       offsets=list(pc.offsets), shape=list(pc.shape)))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        meta = None
        data_state = self.data.state_dict()  # collective over DP
        if self.rank == 0:
            meta = dict(format=FORMAT, step=step, reason=reason, time=time.time(), layout=self.layout,
                        optimizer_step=S.optimizer_step(self.engine), data=data_state, config=to_dict(self.cfg))
        stall = time.perf_counter() - t0
        tmp = os.path.join(self.root, ".tmp-" + step_dir_name(step))
        self._latest, self._error = step, None
        stats = dict(step=step, reason=reason, stall_s=stall, bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
        self.stats.append(stats)
        self._writer = threading.Thread(target=self._write, name=f"ckpt-write-{step}",
                                        args=(tmp, tensors, pieces, shapes, self._rng_tensors(), stats))
        self._writer.start()
        if self.rank == 0:
            self._abort.clear()
            self._committer = threading.Thread(target=self._commit, name=f"ckpt-commit-{step}", args=(tmp, step, meta))
            self._committer.start()
        if not self.cfg.checkpoint.async_save:
            self.sync()
        return time.perf_counter() - t0

    def _to_host(self, key: str, t: torch.Tensor, fresh: bool) -> torch.Tensor:
        """A host copy that training cannot change: device tensors go to reused pinned buffers; host tensors
        are copied only when they are the live state."""
        if t.device.type == "cpu":
            t = t.detach().to(torch.float32)
            return t.contiguous() if fresh and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)
        buf = self._pinned.get(key)
        if buf is None or buf.shape != t.shape:
            buf = self._pinned[key] = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        return buf

    @staticmethod
    def _rng_tensors() -> dict[str, torch.Tensor]:
        out = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            out["cuda"] = torch.cuda.get_rng_state()
        for name, st in tensor_parallel.get_cuda_rng_tracker().get_states().items():
            out[f"tracker/{name}"] = st
        return out

    def _write(self, tmp, tensors, pieces, shapes, rng, stats) -> None:
        """Background: this rank's files; its index file, written last, tells rank 0 they are complete."""
        t0 = time.perf_counter()
        try:
            os.makedirs(tmp, exist_ok=True)
            files = {}
            for name, content in ((f"rank-{self.rank:05d}.safetensors", tensors),
                                  (f"rng-{self.rank:05d}.safetensors", rng)):
                path = os.path.join(tmp, name)
                save_file(content, path + ".part")
                fsync_file(path + ".part")
                os.replace(path + ".part", path)
                files[name] = os.path.getsize(path)
            write_json(os.path.join(tmp, f"index-{self.rank:05d}.json"), dict(files=files, pieces=pieces, tensors=shapes))
            stats["write_s"] = time.perf_counter() - t0
        except Exception as e:  # I/O errors, a full disk: reported at the next sync(), on every rank
            self._error = f"{type(e).__name__}: {e}"

    def _commit(self, tmp: str, step: int, meta: dict) -> None:
        """Background, rank 0: once every rank's index is there, publish the checkpoint. Its rename is the
        commit: before it the checkpoint does not exist, after it it is complete."""
        try:
            indexes = [os.path.join(tmp, f"index-{r:05d}.json") for r in range(self.world)]
            while not all(os.path.exists(p) for p in indexes):
                if self._abort.wait(0.05):
                    return  # a rank failed (learnt in sync()): nothing to publish
            meta.update(files={}, pieces=[], tensors={})
            for p in indexes:
                with open(p) as f:
                    idx = json.load(f)
                meta["files"].update(idx["files"])
                meta["pieces"] += idx["pieces"]
                meta["tensors"].update(idx["tensors"])
            write_json(os.path.join(tmp, "meta.json"), meta)
            fsync_dir(tmp)
            final = os.path.join(self.root, step_dir_name(step))
            if os.path.exists(final):  # a torn directory of the same step from an earlier crash
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
        except Exception as e:
            self._commit_error = f"{type(e).__name__}: {e}"
            return
        try:  # the checkpoint is complete; what follows only tidies up
            with open(os.path.join(self.root, "latest.tmp"), "w") as f:
                f.write(step_dir_name(step) + "\n")  # for people and tools: restore takes the newest complete one
                f.flush()
                os.fsync(f.fileno())
            os.replace(os.path.join(self.root, "latest.tmp"), os.path.join(self.root, "latest"))
            self._prune(step)
        except OSError as e:
            log.warning(f"checkpoint {step_dir_name(step)} is complete, but updating `latest` or deleting old "
                        f"checkpoints failed: {e}")

    def _prune(self, newest: int) -> None:
        kept = 0
        for step in list_steps(self.root):
            path = os.path.join(self.root, step_dir_name(step))
            if step > newest:
                continue
            try:
                validate(path)
                good = True
            except CheckpointError:
                good = False
            if good and kept < self.cfg.checkpoint.keep:
                kept += 1
                continue
            shutil.rmtree(path, ignore_errors=True)

    # --- waiting -----------------------------------------------------------------------------------------

    def sync(self) -> str | None:
        """Collective: wait for the pending save on every rank; returns why it failed (None: committed or
        nothing pending). Ranks agree by all-reduce, so a rank that could not write (a full disk) is heard
        even when it cannot write anything to the disk."""
        if self._writer is None:
            return None
        self._writer.join()
        self._writer = None
        failed = torch.tensor([1 if self._error else 0], dtype=torch.int32,
                              device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        errors = [None] * self.world
        dist.all_gather_object(errors, self._error if failed.item() else None)
        step = self._latest
        if self.rank == 0:
            if failed.item():
                self._abort.set()
            self._committer.join()
            self._committer = None
            if self._commit_error and not failed.item():
                errors[0] = self._commit_error
            self._commit_error = None
            if any(errors):
                shutil.rmtree(os.path.join(self.root, ".tmp-" + step_dir_name(step)), ignore_errors=True)
        box = [next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            self._committed = step
            return None
        self._latest = self._committed
        message = (f"checkpoint for step {step} was not saved ({box[0]}); the previous checkpoint "
                   f"({step_dir_name(self._committed) if self._committed is not None else 'none'}) is intact")
        if self.rank == 0:
            log.error(message)
        return message

    def finish(self, step: int) -> float | None:
        """Collective, at the end of a run: make sure `step` is committed, saving it (again) if the last save
        was of an earlier step or failed. Returns the stall of that save (None: none was needed); raises
        CheckpointError when it cannot be saved."""
        self.sync()
        if self._committed == step:
            return None
        stall = self.save(step, "end")
        error = self.sync()
        if error:
            raise CheckpointError(error)
        return stall
