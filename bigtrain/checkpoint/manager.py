"""Saving and restoring runs: atomic, asynchronous, verified, resharding on load.

save(step): every rank snapshots what it owns (fp32 master weights and AdamW moments of its parameters,
DP-deduplicated; its RNG states) into host memory -- the only time training waits -- and a background
thread checks that every value is finite (a checkpoint of garbage is never written), writes the files into
`checkpoints/.tmp-step-N/` and hashes them. A second thread on rank 0 waits until every rank's index file is
there, writes meta.json and renames the directory to `step-N` (the commit), then rewrites `latest` and prunes:
the newest `checkpoint.keep` are kept, and the newest healthy one besides while newer ones are not. A crash
at any moment leaves either the previous checkpoints or the new complete one. Once every rank's writer is
done (the training loop asks each step, `ready()`), `sync()` confirms the outcome on every rank -- committed,
or failed with the reason (an I/O error such as a full disk on any rank abandons the new checkpoint); each
outcome is queued for the loop to report (`outcomes`). The end of the run saves its last step again if that
save was lost. Every background thread is a daemon and `close()` stops waiting for them, so no failure path
ever hangs the process.

restore(): the newest complete checkpoint of the run directory whose files match their checksums (torn or
corrupt ones are skipped with a message; all ranks share the hashing), else `checkpoint.load`, loaded into
whatever layout this run has.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from safetensors.torch import save_file

from ..atomic import atomic_path, atomic_write, publish_dir, write_json
from ..config import Config, to_dict
from ..model.layout import ParamMap, param_maps
from . import state as S
from .restore import Restoring
from .store import FORMAT, CheckpointError, file_checksum, healthy, list_steps, step_dir_name, validate

log = logging.getLogger("bigtrain")

COMMIT_WAIT_S = 120.0  # how long rank 0 waits to see every rank's files once all have written them (NFS lag)


@dataclass
class Outcome:
    """What became of one save: committed (error None) or not."""
    step: int
    reason: str
    error: str | None
    stats: dict
    fatal: bool = False   # the snapshot held non-finite values: the run's state is garbage


class Checkpointer(Restoring):
    """Saves (here) and restores (restore.py) the run of one engine and data stream."""

    def __init__(self, cfg: Config, engine, data):
        self.cfg, self.engine, self.data = cfg, engine, data
        self.root = os.path.join(cfg.run.dir, "checkpoints")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.maps: list[ParamMap] = param_maps(engine.module, cfg.model.tie_embeddings)
        self.layout = dict(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline, data=self.dp_size,
                           world=self.world, zero_stage=cfg.parallel.zero_stage)
        self._started: int | None = None     # step of the newest save started (committed or not)
        self._committed: int | None = None   # step of the newest save known to be committed
        self._writer: threading.Thread | None = None
        self._committer: threading.Thread | None = None
        self._abort = threading.Event()
        self._error: str | None = None       # this rank's write failure
        self._fatal = False
        self._commit_error: str | None = None
        self._pending: tuple[str, dict] | None = None  # (reason, stats) of the save in flight
        self._pinned: dict[str, torch.Tensor] = {}
        self.outcomes: list[Outcome] = []  # confirmed saves not yet reported by the loop
        self.stats: list[dict] = []  # per save: stall seconds, bytes written, write seconds (tools/bench_ckpt.py)
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for stale in glob.glob(os.path.join(self.root, ".tmp-step-*")):
                log.warning(f"removing {stale}: a checkpoint whose save never completed")
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()

    # --- save --------------------------------------------------------------------------------------------

    def save(self, step: int, reason: str, extra: dict | None = None) -> float:
        """Snapshot now, write in the background (or now, with checkpoint.async_save=false). Collective.
        `extra` (rank 0's; JSON) goes into meta.json: the run's health and the trainer's state. Returns how long
        training waited (seconds), the previous save's unfinished write included."""
        if step == self._started:
            return 0.0
        t0 = time.perf_counter()
        self.sync()
        with_moments = S.optimizer_step(self.engine) is not None
        if with_moments:
            S.link_moments(self.engine)
        tensors, pieces, shapes = {}, [], {}
        fname = f"rank-{self.rank:05d}.safetensors"
        for j, m in enumerate(self.maps):
            state, fresh = S.shard_state(self.engine, m, with_moments)  # collective over DP under ZeRO
            if not (m.owner and j % self.dp_size == self.dp_rank):
                continue
            shapes[m.global_name] = list(m.full_shape)
            for kind, t in state.items():
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
                        optimizer_step=S.optimizer_step(self.engine), data=data_state, config=to_dict(self.cfg),
                        **(extra or {}))
        stall = time.perf_counter() - t0
        tmp = os.path.join(self.root, ".tmp-" + step_dir_name(step))
        self._started, self._error, self._fatal, self._commit_error = step, None, False, None
        stats = dict(step=step, reason=reason, stall_s=stall, bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
        self.stats.append(stats)
        self._pending = (reason, stats)
        self._abort.clear()
        self._writer = threading.Thread(target=self._write, name=f"ckpt-write-{step}", daemon=True,
                                        args=(tmp, tensors, pieces, shapes, self._rng_tensors(), stats))
        self._writer.start()
        if self.rank == 0:
            self._committer = threading.Thread(target=self._commit, name=f"ckpt-commit-{step}", daemon=True,
                                               args=(tmp, step, meta))
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
        """Background: check, write and hash this rank's files; its index file, written last, tells rank 0 they
        are complete."""
        t0 = time.perf_counter()
        try:
            for key, t in tensors.items():  # a sum is finite iff every value is (or it overflowed: look closer)
                if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
                    self._fatal = True
                    raise ValueError(f"non-finite values in {key} ({int((~torch.isfinite(t)).sum())} of {t.numel()}): "
                                     "the weights are garbage and are not saved")
            stats["check_s"] = time.perf_counter() - t0
            os.makedirs(tmp, exist_ok=True)
            files, checksums = {}, {}
            stats["hash_s"] = 0.0
            for name, content in ((f"rank-{self.rank:05d}.safetensors", tensors),
                                  (f"rng-{self.rank:05d}.safetensors", rng)):
                path = os.path.join(tmp, name)
                with atomic_path(path, fsync=True) as part:
                    save_file(content, part)
                files[name] = os.path.getsize(path)
                t1 = time.perf_counter()
                checksums[name] = file_checksum(path)
                stats["hash_s"] += time.perf_counter() - t1
            write_json(os.path.join(tmp, f"index-{self.rank:05d}.json"),
                       dict(files=files, checksums=checksums, pieces=pieces, tensors=shapes))
            stats["write_s"] = time.perf_counter() - t0
        except Exception as e:  # I/O errors, a full disk, garbage: reported by sync(), on every rank
            self._error = f"{type(e).__name__}: {e}"

    def _commit(self, tmp: str, step: int, meta: dict) -> None:
        """Background, rank 0: once every rank's index is there, publish the checkpoint. Its rename is the
        commit: before it the checkpoint does not exist, after it it is complete."""
        try:
            indexes = [os.path.join(tmp, f"index-{r:05d}.json") for r in range(self.world)]
            while not all(os.path.exists(p) for p in indexes):
                if self._abort.wait(0.05) or self._error is not None:
                    return  # a rank failed (this one, or another as sync() learnt): nothing to publish
            meta.update(files={}, checksums={}, pieces=[], tensors={})
            for p in indexes:
                with open(p) as f:
                    idx = json.load(f)
                meta["files"].update(idx["files"])
                meta["checksums"].update(idx["checksums"])
                meta["pieces"] += idx["pieces"]
                meta["tensors"].update(idx["tensors"])
            write_json(os.path.join(tmp, "meta.json"), meta)
            # replace: a torn directory of the same step from an earlier crash
            publish_dir(tmp, os.path.join(self.root, step_dir_name(step)), replace=True)
        except Exception as e:
            self._commit_error = f"{type(e).__name__}: {e}"
            return
        try:  # the checkpoint is complete; what follows only tidies up
            with atomic_write(os.path.join(self.root, "latest")) as f:
                f.write(step_dir_name(step) + "\n")  # for people and tools: restore takes the newest complete one
            self._prune(step)
        except OSError as e:
            log.warning(f"checkpoint {step_dir_name(step)} is complete, but updating `latest` or deleting old "
                        f"checkpoints failed: {e}")

    def _prune(self, newest: int) -> None:
        """Keep the newest `checkpoint.keep` complete checkpoints up to `newest`, and the newest healthy one
        besides while every kept one is unhealthy (a run going bad never prunes its last good state away)."""
        kept, keep_healthy = 0, False
        for step in list_steps(self.root):
            if step > newest:
                continue
            path = os.path.join(self.root, step_dir_name(step))
            try:
                good, well = True, healthy(validate(path))
            except CheckpointError:
                good = well = False
            if good and kept < self.cfg.checkpoint.keep:
                kept += 1
                keep_healthy = keep_healthy or well
                continue
            if good and well and not keep_healthy:
                keep_healthy = True
                log.info(f"keeping {step_dir_name(step)}: the newest healthy checkpoint (the newer ones were saved "
                         "while the run was unwell)")
                continue
            shutil.rmtree(path, ignore_errors=True)

    # --- waiting -----------------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Local, cheap: True when this rank has no save in flight or its writer is done (then the loop can
        have every rank `sync()` without waiting)."""
        return self._writer is None or not self._writer.is_alive()

    @property
    def pending(self) -> bool:
        return self._writer is not None

    def sync(self) -> str | None:
        """Collective: wait for the pending save on every rank and confirm its outcome; returns why it failed
        (None: committed or nothing pending), and queues the outcome in `outcomes`. Ranks agree by all-reduce,
        so a rank that could not write (a full disk) is heard even when it cannot write anything to the disk."""
        if self._writer is None:
            return None
        self._writer.join()
        self._writer = None
        failed = torch.tensor([2 if self._fatal else 1 if self._error else 0], dtype=torch.int32,
                              device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        errors = [None] * self.world
        dist.all_gather_object(errors, self._error if failed.item() else None)
        step = self._started
        if self.rank == 0:
            if failed.item():
                self._abort.set()
            self._committer.join(COMMIT_WAIT_S)  # every writer is done: their index files are (or soon are) there
            if self._committer.is_alive():
                self._abort.set()
                self._committer.join()
                missing = [r for r in range(self.world) if not os.path.exists(os.path.join(
                    self.root, ".tmp-" + step_dir_name(step), f"index-{r:05d}.json"))]
                self._commit_error = (f"rank 0 does not see the files of ranks {missing} in {self.root} "
                                      f"{COMMIT_WAIT_S:.0f} s after they were written: run.dir must be one directory "
                                      "on a file system every rank shares")
            self._committer = None
            if self._commit_error:
                errors[0] = errors[0] or self._commit_error
            if any(errors):
                shutil.rmtree(os.path.join(self.root, ".tmp-" + step_dir_name(step)), ignore_errors=True)
        box = [next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)]
        dist.broadcast_object_list(box, src=0)
        reason, stats = self._pending
        self._pending = None
        if box[0] is None:
            self._committed = step
            self.outcomes.append(Outcome(step, reason, None, stats))
            return None
        self._started = self._committed
        message = (f"checkpoint for step {step} was not saved ({box[0]}); the previous checkpoint "
                   f"({step_dir_name(self._committed) if self._committed is not None else 'none'}) is intact")
        if self.rank == 0:
            log.error(message)
        self.outcomes.append(Outcome(step, reason, message, stats, fatal=failed.item() == 2))
        return message

    def finish(self, step: int, extra: dict | None = None) -> float | None:
        """Collective, at the end of a run: make sure `step` is committed, saving it (again) if the last save
        was of an earlier step or failed. Returns the stall of that save (None: none was needed); raises
        CheckpointError when it cannot be saved."""
        self.sync()
        if self._committed == step:
            return None
        stall = self.save(step, "end", extra)
        error = self.sync()
        if error:
            raise CheckpointError(error)
        return stall

    @property
    def committed(self) -> int | None:
        return self._committed

    def close(self) -> None:
        """Not collective, never blocks for long: stop waiting for an unfinished save (an error is ending the run;
        the daemon writer dies with the process, and its temporary directory is removed at the next start)."""
        self._abort.set()
        if self._committer is not None:
            self._committer.join(timeout=5)
