"""Shard paths and streams without a server: which transport reads a path, one-line refusals at start-up and at
config check, and a tar cut at a member boundary caught by its missing end blocks."""
import io
import os
import re
import tarfile

import pytest
import webdataset as wds

from bigtrain.config import ConfigError, load_config
from bigtrain.data import open_source
from bigtrain.data.remote import ReadOptions, ShardReadError, check_url, is_dir_url, join, open_shard, scheme
from bigtrain.errors import BigtrainError


@pytest.mark.parametrize("path, want", [
    ("/data/x.tar", ""), ("rel/x-{0..3}.tar", ""), ("pipe:cat /x.tar", "pipe"), ("http://h/x.tar", "http"),
    ("HTTPS://h/d/", "https"), ("s3://b/k.tar", "s3"), ("gs://b/k", "gs"),
])
def test_scheme(path, want):
    assert scheme(path) == want


def test_directories_and_join():
    assert is_dir_url("https://h/d/") and is_dir_url("s3://b/p/") and not is_dir_url("s3://b/p/x.tar")
    assert not is_dir_url("/local/dir/")
    assert join("s3://b/p/", "manifest.json") == "s3://b/p/manifest.json" == join("s3://b/p", "manifest.json")
    assert join("/a/b", "m.json") == os.path.join("/a/b", "m.json")


@pytest.mark.parametrize("url, message", [
    ("gs://b/x.tar", "data source gs://b/x.tar: unsupported scheme 'gs:' (local paths, http://, https://, s3:// and "
                     "pipe:COMMAND are; read another store through a pipe: command)"),
    ("s3://bucket", "data source s3://bucket: expected s3://BUCKET/KEY"),
    ("http:///x.tar", "data source http:///x.tar: no host in the URL (expected http://HOST/PATH)"),
    ("pipe: ", "data source pipe: : a pipe: source needs a command (pipe:COMMAND)"),
])
def test_unreadable_urls_are_refused_in_one_line(url, message):
    with pytest.raises(BigtrainError) as e:
        check_url(url)
    assert str(e.value) == message
    with pytest.raises(BigtrainError, match="^data source"):
        open_source(url)


@pytest.mark.parametrize("override, key", [
    ("data.sources=[{path: 'http://127.0.0.1:9/d/'}]", "data.sources[0].path"),
    ("data.sources=['pipe:cat /x-{0..3}.tar']", "data.sources[0].path"),
    ("data.validation={val: 's3://b/val/'}", "data.validation[0].path"),
    ("data.tokenizer=https://h/tok.model", "data.tokenizer"),
])
def test_prepare_takes_local_paths_only(override, key):
    base = ["data.prepare=stdlib", "data.sources=[{path: data/stdlib/train}]", "data.tokenizer=data/tok.model"]
    with pytest.raises(ConfigError, match=rf"^config key 'data.prepare': {re.escape(key)} is .+, not a local path"):
        load_config(None, [*base, override])
    load_config(None, base)


@pytest.mark.parametrize("override, message", [
    ("data.stall_timeout=0", "config key 'data.stall_timeout': expected > 0 seconds, got 0.0"),
    ("data.retries=-1", "config key 'data.retries': expected >= 0, got -1"),
])
def test_reading_options_are_checked(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def _tar(path, members=4):
    with wds.TarWriter(path, encoder=False) as w:
        for i in range(members):
            w.write({"__key__": f"{i:09d}", "npy": bytes(3000), "npy.xxh3": b"0" * 16})


def _drain(stream):
    for _ in wds.tariterators.tar_file_iterator(stream):
        pass
    stream.finish()


def test_a_tar_cut_at_a_member_boundary_is_caught(tmp_path):
    path = str(tmp_path / "x.tar")
    _tar(path)
    stream = open_shard(path, ReadOptions())
    _drain(stream)  # whole: no error
    stream.close()
    with tarfile.open(path) as t:
        cut = t.getmembers()[4].offset  # the third member's header
    with open(path, "r+b") as f:
        f.truncate(cut)
    assert sum(1 for _ in wds.tariterators.tar_file_iterator(io.BytesIO(open(path, "rb").read()))) == 4  # silent
    stream = open_shard(path, ReadOptions())
    with pytest.raises(ShardReadError, match=rf"^truncated: the tar ends after {cut} bytes, without its "
                                             "end-of-archive blocks$"):
        _drain(stream)
    stream.close()


def test_a_missing_local_shard_is_a_missing_object(tmp_path):
    stream = open_shard(str(tmp_path / "none.tar"), ReadOptions(retries=5, retry_backoff=60))
    with pytest.raises(ShardReadError, match="^No such file or directory$") as e:
        stream.read(10)
    assert e.value.missing and not e.value.transient
