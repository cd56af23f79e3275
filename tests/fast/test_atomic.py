"""The one atomic-write helper: a reader sees the old content or the whole new one; failures leave nothing."""
import os

import pytest

from bigtrain.atomic import atomic_dir, atomic_path, atomic_write, write_json


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    p = str(tmp_path / "f.txt")
    write_json(p, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(p) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert open(p).read() == '{\n "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["f.txt"]  # no temporary file left
    with atomic_write(p, "wb") as f:
        f.write(b"new")
    assert open(p, "rb").read() == b"new"


def test_atomic_path_and_dir(tmp_path):
    p = str(tmp_path / "x.bin")
    with atomic_path(p) as tmp:
        assert tmp != p and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "wb").write(b"1")
    assert open(p, "rb").read() == b"1"
    d = str(tmp_path / "out")
    with pytest.raises(ValueError):
        with atomic_dir(d) as tmp:
            open(os.path.join(tmp, "a"), "w").write("a")
            raise ValueError
    assert not os.path.exists(d) and not os.path.exists(d + ".partial")
    os.makedirs(d)  # an empty directory given as the output is fine
    with atomic_dir(d) as tmp:
        open(os.path.join(tmp, "a"), "w").write("a")
    assert os.listdir(d) == ["a"]
