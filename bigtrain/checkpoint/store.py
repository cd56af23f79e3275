"""The on-disk checkpoint format: tensor-only, layout-independent, read back on any layout.

    RUN/checkpoints/step-00000100/
        meta.json                 step, resolved config, data-loader state, saved layout, tensor index, file sizes
                                  and checksums, the run's health at this step, the trainer's own state
        rank-00003.safetensors    the pieces of full tensors that rank 3 owned (no other rank writes them)
        index-00003.json          rank 3's piece index; its presence means rank 3's files are complete
        rng-00003.safetensors     rank 3's RNG states (restored only on the same layout)
    RUN/checkpoints/latest        name of the newest complete checkpoint, written last

A piece is a rectangle of a full tensor (`offsets` + `shape`); kinds are `model` (fp32 master weights),
`exp_avg`, `exp_avg_sq` (AdamW moments). A reader assembles any rectangle of any tensor from whichever
pieces overlap it, so a checkpoint saved with one TP/PP/DP/ZeRO layout loads into another. Only JSON and
safetensors are ever read: nothing is unpickled.

Integrity: `files` gives each file's size (a torn write is caught by `validate`), `checksums` its xxh3-128
digest (flipped bytes are caught by `verify`, which reads the files). `health` says whether the run was
well at this step (no non-finite step and no loss spike since the previous checkpoint): pruning keeps the newest
healthy checkpoint, and a rewind goes back to one. Checkpoints written before checksums and health existed
load as they are (unverified, healthy).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..errors import BigtrainError

FORMAT = "bigtrain-checkpoint-1"
STEP_DIR = re.compile(r"^step-(\d{8})$")
CHECKSUM = "xxh3_128"


class CheckpointError(BigtrainError):
    """A checkpoint that cannot be used (missing, torn, or not matching the model)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def file_checksum(path: str) -> str:
    """'xxh3_128:<hex>' of a file's bytes (about 15 GB/s on one core: it never limits a save or a load)."""
    import mmap

    import xxhash
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return f"{CHECKSUM}:{xxhash.xxh3_128(b'').hexdigest()}"
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:  # hashed in place: no copy into Python
            return f"{CHECKSUM}:{xxhash.xxh3_128(m).hexdigest()}"


def validate(path: str) -> dict:
    """meta.json of a complete checkpoint directory, or CheckpointError saying what is wrong with it."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no meta.json (not a bigtrain checkpoint, or its save never completed)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                              f"expected {FORMAT!r}")
    missing = [k for k in ("step", "files", "pieces", "tensors", "layout", "config") if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: lacks {', '.join(missing)}")
    for name, size in meta["files"].items():
        fp = os.path.join(path, name)
        try:
            actual = os.path.getsize(fp)
        except OSError:
            raise CheckpointError(f"{path}: file {name} is missing") from None
        if actual != size:
            raise CheckpointError(f"{path}: file {name} has {actual} bytes, expected {size} (torn write)")
    return meta


def verify(path: str, meta: dict, names=None) -> None:
    """Check files of a validated checkpoint (default: all) against the checksums in its meta.json;
    CheckpointError naming the first file that does not match."""
    sums = meta.get("checksums") or {}
    for name in sorted(sums) if names is None else names:
        got = file_checksum(os.path.join(path, name))
        if got != sums[name]:
            raise CheckpointError(f"{path}: file {name} does not match its checksum ({got.split(':')[-1][:16]}..., "
                                  f"expected {sums[name].split(':')[-1][:16]}...): corrupt")


def healthy(meta: dict) -> bool:
    return bool((meta.get("health") or {}).get("healthy", True))


@dataclass
class Chunk:
    file: str
    key: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


class Reader:
    """Assembles rectangles of full tensors from a checkpoint's pieces."""

    def __init__(self, path: str, meta: dict | None = None):
        self.path = path
        self.meta = meta or validate(path)
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in self.meta["tensors"].items()}
        self.chunks: dict[tuple[str, str], list[Chunk]] = {}
        for e in self.meta["pieces"]:
            self.chunks.setdefault((e["kind"], e["name"]), []).append(
                Chunk(e["file"], e["key"], tuple(e["offsets"]), tuple(e["shape"])))
        self._files: dict[str, object] = {}

    def _open(self, file: str):
        if file not in self._files:
            self._files[file] = safe_open(os.path.join(self.path, file), framework="pt")
        return self._files[file]

    def read(self, kind: str, name: str, offsets=None, shape=None, dtype=torch.float32) -> torch.Tensor:
        """The rectangle (offsets, shape) of tensor `name` (default: all of it)."""
        if name not in self.shapes:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        full = self.shapes[name]
        offsets = offsets or (0,) * len(full)
        shape = shape or full
        out = torch.empty(shape, dtype=dtype)
        filled = 0
        for c in self.chunks.get((kind, name), []):
            lo = [max(a, b) for a, b in zip(offsets, c.offsets)]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, shape, c.offsets, c.shape)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            src = self._open(c.file).get_slice(c.key)[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, c.offsets))]
            out[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))] = src
            filled += torch.Size([h - l for l, h in zip(lo, hi)]).numel()
        if filled != out.numel():
            raise CheckpointError(f"{self.path}: {kind} of {name!r} is incomplete ({filled} of {out.numel()} "
                                  f"values in region {offsets}+{shape})")
        return out

    def close(self) -> None:
        self._files.clear()


def list_steps(ckpt_root: str) -> list[int]:
    """Steps of the checkpoint directories under `ckpt_root`, newest first (complete or not)."""
    if not os.path.isdir(ckpt_root):
        return []
    steps = [int(m.group(1)) for n in os.listdir(ckpt_root) if (m := STEP_DIR.match(n))]
    return sorted(steps, reverse=True)


def complete(root: str, on_skip=None, verify_files: bool = False):
    """Yield (directory, meta) of the complete checkpoints under `root`, newest first (lazily: each is read
    when asked for); `on_skip(path, error)` hears of each one that is not (torn, or with `verify_files` corrupt)."""
    for step in list_steps(root):
        cand = os.path.join(root, step_dir_name(step))
        try:
            meta = validate(cand)
            if verify_files:
                verify(cand, meta)
        except CheckpointError as e:
            if on_skip is not None:
                on_skip(cand, e)
            continue
        yield cand, meta


def newest_complete(root: str, on_skip=None, verify_files: bool = False) -> str | None:
    """The newest complete checkpoint directory under `root` (see `complete`), or None."""
    return next((path for path, _ in complete(root, on_skip, verify_files)), None)


def resolve(path: str, verify_files: bool = True) -> str:
    """A checkpoint directory given itself, a run directory, or a run's checkpoints/ directory: the newest
    complete (and, with `verify_files`, uncorrupted) checkpoint in it."""
    if os.path.exists(os.path.join(path, "meta.json")):
        meta = validate(path)
        if verify_files:
            verify(path, meta)
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        skipped = []
        found = newest_complete(root, lambda p, e: skipped.append(str(e)), verify_files)
        if found:
            return found
        if list_steps(root):
            raise CheckpointError(f"{root}: no complete checkpoint among {len(list_steps(root))} step directories"
                                  + (f" (newest: {skipped[0]})" if skipped else ""))
    raise CheckpointError(f"{path}: not a checkpoint, run directory or checkpoints directory")
