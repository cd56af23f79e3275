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

    def __init__(self, path: str):
        self.path = path
        self.meta = validate(path)
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

    def read(self, kind: str, name: str, offsets=None, shape=None) -> torch.Tensor:
        """The rectangle (offsets, shape) of tensor `name` (default: all of it), in fp32."""
        if name not in self.shapes:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        full = self.shapes[name]
        offsets = offsets or (0,) * len(full)
        shape = shape or full
        out = torch.empty(shape, dtype=torch.float32)
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


class SafetensorsFiles:
    """Tensors written into safetensors files of at most `limit` bytes each, in a directory of their own (one
    published as a whole, e.g. through `atomic_dir`): `add()` them in order, `close(names)` names the files --
    `names(n)` gives the n final names -- and returns {tensor key: file name}; `sizes` then holds each file's size."""

    def __init__(self, directory: str, limit: int, metadata: dict | None = None):
        self.directory, self.limit, self.metadata = directory, limit, metadata
        self.current: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.where: dict[str, int] = {}   # tensor key -> file number
        self.count = 0
        self.sizes: dict[str, int] = {}

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.current and self.size + nbytes > self.limit:
            self._flush()
        self.current[key] = t.contiguous()
        self.where[key] = self.count
        self.size += nbytes
        self.total += nbytes

    def _part(self, n: int) -> str:
        return os.path.join(self.directory, f".part-{n:05d}.safetensors")

    def _flush(self) -> None:
        from safetensors.torch import save_file
        save_file(self.current, self._part(self.count), metadata=self.metadata)
        self.count += 1
        self.current, self.size = {}, 0

    def close(self, names) -> dict[str, str]:
        if self.current:
            self._flush()
        final = names(self.count)
        for i, name in enumerate(final):
            os.replace(self._part(i), os.path.join(self.directory, name))
            self.sizes[name] = os.path.getsize(os.path.join(self.directory, name))
        return {k: final[i] for k, i in self.where.items()}


class FullCheckpointWriter:
    """A checkpoint of whole tensors written by one process (an import from Hugging Face): weights only, no
    optimizer state, files `rank-NNNNN.safetensors` of at most `limit` bytes, meta.json last. Write it into a
    directory published as a whole (`atomic_dir`)."""

    def __init__(self, directory: str, limit: int):
        self.directory = directory
        self.files = SafetensorsFiles(directory, limit)
        self.pieces, self.shapes = [], {}

    def add(self, name: str, t: torch.Tensor) -> None:
        key = f"model/{name}/0"
        self.files.add(key, t.to(torch.float32))
        self.shapes[name] = list(t.shape)
        self.pieces.append(dict(kind="model", name=name, key=key, offsets=[0] * t.ndim, shape=list(t.shape)))

    def close(self, **meta) -> dict:
        """Write meta.json (`meta`: config, step, reason, layout, ...); returns it."""
        import time as _time

        from ..atomic import write_json
        where = self.files.close(lambda n: [f"rank-{i:05d}.safetensors" for i in range(n)])
        for e in self.pieces:
            e["file"] = where[e["key"]]
        out = dict(format=FORMAT, step=0, time=_time.time(), optimizer_step=None, data=None, **meta,
                   files=self.files.sizes, checksums={n: file_checksum(os.path.join(self.directory, n))
                                                      for n in self.files.sizes},
                   pieces=self.pieces, tensors=self.shapes)
        write_json(os.path.join(self.directory, "meta.json"), out)
        return out


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


def checkpoint_config(meta: dict, path: str, overrides=()):
    """The run config a checkpoint was saved with (its meta.json), with `key=value` overrides on top."""
    from ..config import ConfigError, load_config
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}/meta.json holds no bigtrain config")
    try:
        return load_config(None, list(overrides), base=meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its meta.json holds no usable bigtrain config ({e})") from None


def checkpoint_tokenizer(cfg, path: str) -> str:
    """The tokenizer of a checkpoint's run (`data.tokenizer`), or the one an import carries beside it ("" when
    there is none)."""
    if cfg.data.tokenizer and os.path.exists(cfg.data.tokenizer):
        return cfg.data.tokenizer
    for root in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(os.path.join(root, name)):
                return os.path.join(root, name)
    return cfg.data.tokenizer
