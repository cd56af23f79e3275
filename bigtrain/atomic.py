"""Atomic file and directory writes: the one write-aside-then-rename helper every writer uses.

A reader (another process, a restart after kill -9 or a power cut) sees either the old content or the complete
new content, never a torn file:

    with atomic_write(path) as f:          # text (mode "wb" for bytes)
        f.write(...)
    write_json(path, obj)                  # the same, for one JSON document
    with atomic_path(path) as tmp:         # for writers that want a file name (safetensors, tar writers)
        save_file(tensors, tmp)
    with atomic_dir(path) as tmp:          # a whole directory, published by one rename
        ...
    publish_dir(tmp, path)                 # a directory several writers filled aside (a checkpoint's ranks)

The temporary name sits in the same directory (a rename never crosses file systems), starts with '.', and
carries the writer's pid and thread so that concurrent writers never share one. With `fsync=True` (the
default) the file is flushed to the device before the rename and the directory after it, so the new name
survives a crash; pass `fsync=False` for files that are rewritten often and whose loss costs nothing.
On any error the temporary file is removed and the old content stays.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading


def _tmp_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp-{os.getpid()}-{threading.get_ident()}")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _publish(tmp: str, path: str, fsync: bool) -> None:
    os.replace(tmp, path)
    if fsync:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_path(path: str, fsync: bool = True):
    """Yield a temporary file name beside `path`; when the block succeeds the file written there replaces
    `path` (fsynced first)."""
    tmp = _tmp_name(path)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        _publish(tmp, path, fsync)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", fsync: bool = True, encoding: str | None = "utf-8"):
    """Yield an open file whose content replaces `path` when the block succeeds."""
    with atomic_path(path, fsync=False) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    if fsync:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json(path: str, obj, fsync: bool = True, indent: int | None = 1) -> None:
    """One JSON document, atomically."""
    with atomic_write(path, fsync=fsync) as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_text(path: str, text: str, fsync: bool = True) -> None:
    with atomic_write(path, fsync=fsync) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str, fsync: bool = True, replace: bool = False):
    """Yield a temporary directory beside `path`, renamed to `path` when the block succeeds (removed when it
    fails). `path` must not exist unless it is an empty directory, or `replace` is true."""
    path = os.path.abspath(path).rstrip("/")
    tmp = path + ".partial"
    _remove(tmp)  # left by an interrupted earlier attempt
    os.makedirs(tmp)
    try:
        yield tmp
        publish_dir(tmp, path, fsync=fsync, replace=replace)
    except BaseException:
        _remove(tmp)
        raise


def publish_dir(tmp: str, path: str, fsync: bool = True, replace: bool = False) -> None:
    """Publish a directory filled aside (by several writers, e.g. every rank's part of a checkpoint) under
    `path` by one rename. `path` must not exist unless it is an empty directory, or `replace` is true (a torn
    earlier attempt at the same name)."""
    if fsync:
        fsync_dir(tmp)
    if os.path.isdir(path) and (replace or not os.listdir(path)):
        shutil.rmtree(path) if replace else os.rmdir(path)
    _publish(tmp, path, fsync)
