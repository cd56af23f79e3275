"""The checkpoint format without an engine: rectangles of full tensors from pieces, completeness, checksums,
the single-process writer."""
import os

import pytest
import torch

from bigtrain.atomic import write_json
from bigtrain.checkpoint.store import (FORMAT, CheckpointError, FullCheckpointWriter, Reader, complete, healthy,
                                       resolve, step_dir_name, validate, verify)


def _checkpoint(path, full, cuts, step=1, health=None):
    """Save `full` as the pieces `cuts` (row ranges) in two files, as two TP ranks would."""
    from safetensors.torch import save_file
    os.makedirs(path)
    pieces, files = [], {}
    for r, (lo, hi) in enumerate(cuts):
        name = f"rank-{r:05d}.safetensors"
        save_file({f"model/w/{r}": full[lo:hi].contiguous()}, os.path.join(path, name))
        files[name] = os.path.getsize(os.path.join(path, name))
        pieces.append(dict(kind="model", name="w", key=f"model/w/{r}", file=name, offsets=[lo, 0],
                           shape=[hi - lo, full.shape[1]]))
    from bigtrain.checkpoint.store import file_checksum
    meta = dict(format=FORMAT, step=step, files=files, checksums={n: file_checksum(os.path.join(path, n)) for n in files},
                pieces=pieces, tensors={"w": list(full.shape)}, layout={}, config={},
                **({"health": health} if health else {}))
    write_json(os.path.join(path, "meta.json"), meta)


def test_any_rectangle_assembles_from_the_pieces(tmp_path):
    full = torch.arange(48, dtype=torch.float32).view(8, 6)
    _checkpoint(str(tmp_path / "c"), full, [(0, 3), (3, 8)])
    r = Reader(str(tmp_path / "c"))
    assert torch.equal(r.read("model", "w"), full)
    assert torch.equal(r.read("model", "w", (2, 1), (4, 3)), full[2:6, 1:4])  # spans both pieces
    with pytest.raises(CheckpointError, match="has no tensor 'v'"):
        r.read("model", "v")


def test_torn_and_corrupt_files_are_named(tmp_path):
    full = torch.randn(8, 6)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _checkpoint(str(root / step_dir_name(step)), full, [(0, 4), (4, 8)], step,
                    health={"healthy": step != 2})
    third = str(root / step_dir_name(3))
    with open(os.path.join(third, "rank-00001.safetensors"), "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\xff\xff\xff")
    validate(third)  # same size
    with pytest.raises(CheckpointError, match="rank-00001.safetensors does not match its checksum"):
        verify(third, validate(third))
    skipped = []
    assert [os.path.basename(p) for p, _ in complete(str(root), lambda p, e: skipped.append(p), True)] == \
        [step_dir_name(2), step_dir_name(1)]
    assert skipped == [third]
    assert [healthy(m) for _, m in complete(str(root))] == [True, False, True]
    assert resolve(str(tmp_path)).endswith(step_dir_name(2))
    os.truncate(os.path.join(str(root / step_dir_name(2)), "rank-00000.safetensors"), 10)
    with pytest.raises(CheckpointError, match="has 10 bytes, expected .* \\(torn write\\)"):
        validate(str(root / step_dir_name(2)))


def test_full_writer_splits_files_and_reads_back(tmp_path):
    d = str(tmp_path / "imp")
    os.makedirs(d)
    w = FullCheckpointWriter(d, limit=300)
    tensors = {f"t{i}": torch.randn(5, 7) for i in range(4)}
    for k, t in tensors.items():
        w.add(k, t)
    meta = w.close(reason="test", layout={}, config={})
    assert len(meta["files"]) > 1 and set(meta["checksums"]) == set(meta["files"])
    verify(d, validate(d))
    r = Reader(d)
    assert all(torch.equal(r.read("model", k), t) for k, t in tensors.items())
