"""Remote shards through the real loader, against real servers on 127.0.0.1: an HTTP server this module controls
(it can cut a shard short, stall mid-shard, answer 404 or 503, honour Range or not) and moto's S3 server.

Healthy remote sources read exactly the samples of the local directory, resumes included; every fault is either
retried away (resumed at the byte reached) or skipped and counted with the members the remote manifest says were
lost, never blocking for much more than data.stall_timeout per attempt. `pipe:` commands: a non-zero exit, a
truncated tar and a stall are errors too.
"""
import collections
import http.server
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse

import numpy as np
import pytest

import helpers
from bigtrain.config.schema import Config, DataSource
from bigtrain.data import build_train_source, open_source
from bigtrain.data.remote import ReadOptions
from bigtrain.data.stream import TokenStream
from bigtrain.errors import BigtrainError

SEQ, VOCAB = helpers.SEQ, helpers.VOCAB
G = 12      # global batch of the shuffled, laned stream
P = 16      # batch of the plain-order stream (one lane): one member of the `data` fixture's shards
FAST = dict(stall_timeout=1.0, connect_timeout=1.0, retries=2, retry_backoff=0.05)
THREE = "shard-{000000..000002}.tar"  # 3 shards x 8 members x 16 samples of train_b


# ---------------------------------------------------------------------------------------------- servers

class ShardServer(http.server.ThreadingHTTPServer):
    """Serves files under `root`. `faults[name]` (a shard's file name, or "*" for every path) maps the number of
    earlier requests for that path to an action: ("status", code), ("cut", byte): close the connection at that byte
    of the object, ("stall", byte): stop sending there until the test ends, or None: serve it. `ranges`: honour
    `Range: bytes=N-`."""
    daemon_threads = True

    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), Handler)
        self.root, self.faults, self.ranges = root, {}, True
        self.requests = collections.Counter()
        self.release = threading.Event()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        pass  # a client that gave up on a stalled or cut reply


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        rel = urllib.parse.unquote(self.path.split("?")[0]).lstrip("/")
        name = os.path.basename(rel)
        n = srv.requests[rel]
        srv.requests[rel] += 1
        fault = srv.faults.get(name, srv.faults.get("*", lambda n: None))(n)
        path = os.path.join(srv.root, rel)
        if fault and fault[0] == "stall" and fault[1] == 0:  # a black hole: not even a status line
            srv.release.wait(60)
            return
        if (fault and fault[0] == "status") or not os.path.isfile(path):
            self.send_response(fault[1] if fault else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = open(path, "rb").read()
        start, rng = 0, self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{len(data)}"')
        self.end_headers()
        if fault is None:
            self.wfile.write(data[start:])
            return
        self.wfile.write(data[start:max(start, fault[1])])
        self.wfile.flush()
        if fault[0] == "stall":
            srv.release.wait(60)
        self.close_connection = True


def serve(root):
    srv = ShardServer(root)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    return srv


def stop(srv):
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def http(data):
    srv = serve(os.path.dirname(data["train_b"]))
    yield srv
    stop(srv)


@pytest.fixture(scope="module")
def moto_server(data):
    """moto's S3 server with train_b under s3://shards/train_b/, shards 0 and 2 and the manifest under holes/,
    shards 0 and 2 alone under bare/."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test")
    s3.create_bucket(Bucket="shards")
    d = data["train_b"]
    for f in sorted(os.listdir(d)):
        s3.upload_file(os.path.join(d, f), "shards", f"train_b/{f}")
    for prefix, names in (("holes", ["shard-000000.tar", "shard-000002.tar", "manifest.json"]),
                          ("bare", ["shard-000000.tar", "shard-000002.tar"])):
        for f in names:
            s3.upload_file(os.path.join(d, f), "shards", f"{prefix}/{f}")
    yield endpoint
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    for k, v in dict(AWS_ENDPOINT_URL=moto_server, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                     AWS_DEFAULT_REGION="us-east-1").items():
        monkeypatch.setenv(k, v)
    return "s3://shards"


# ---------------------------------------------------------------------------------------------- reading

def make_cfg(path, lanes=4, seq=SEQ, num_workers=0, **reading):
    c = Config()
    c.data.sources = [DataSource(path=path)]
    c.data.lanes, c.data.num_workers = lanes, num_workers
    c.model.seq_length, c.model.vocab_size, c.train.global_batch_size = seq, VOCAB, G
    for k, v in {**FAST, **reading}.items():
        setattr(c.data, k, v)
    return c


def read(cfg, steps, state=None):
    """`steps` global batches of the shuffled, laned training stream (from `state`), and the state after."""
    src = build_train_source(cfg, 0, 1)
    try:
        if state is not None:
            src.load_state_dict(state)
        return np.concatenate([src.next_batch().numpy() for _ in range(steps)]), src.state_dict()
    finally:
        src.close()


def read_plain(path, batches, **reading):
    """`batches` batches of P samples in plain order (one lane, no shuffle), and the lane's counters."""
    src = open_source(path, reading=ReadOptions(**{**FAST, **reading}))
    stream = TokenStream([src], seq_len=SEQ, vocab_size=VOCAB, global_batch=P, lanes=1, shuffle=False,
                         max_skip_fraction=1.0)
    try:
        return np.concatenate([stream.next_batch().numpy() for _ in range(batches)]), stream.lane_states[0]
    finally:
        stream.close()


def npy_members(path):
    with tarfile.open(path) as t:
        return [m for m in t.getmembers() if m.name.endswith(".npy")]


@pytest.fixture(scope="module")
def local_three(data):
    """The 384 samples of train_b's first three shards in plain order, and a byte inside shard 1's 4th member."""
    rows, state = read_plain(os.path.join(data["train_b"], THREE), 24)
    assert state["skipped"] == 0
    return rows, npy_members(os.path.join(data["train_b"], "shard-000001.tar"))[3].offset_data + 100


def without(rows, shard, first, members):
    """`rows` less `members` members (P samples each) of `shard` (128 samples) from member `first`."""
    keep = np.ones(len(rows), bool)
    keep[shard * 128 + first * P:shard * 128 + (first + members) * P] = False
    return rows[keep]


# ---------------------------------------------------------------------------------------------- healthy

def test_http_and_s3_read_like_the_local_directory(data, http, s3):
    """Directory URLs and brace-expanded URL lists (with the manifest beside them), over HTTP and S3: the same
    global sample sequence as the local directory, and a resume from a mid-shard position continues it."""
    n = len(os.listdir(data["train_b"])) - 1
    ref, _ = read(make_cfg(data["train_b"]), 40)
    # (loader workers come from a forkserver that may predate the `s3` fixture's AWS environment: HTTP only)
    for path, workers in ((f"{http.url}/train_b/", 2), (f"{http.url}/train_b/shard-{{000000..{n - 1:06d}}}.tar", 0),
                          (f"{s3}/train_b/", 0), (f"{s3}/train_b/shard-{{000000..{n - 1:06d}}}.tar", 0)):
        cfg = make_cfg(path, num_workers=workers)
        src = open_source(path)
        assert src.manifest is not None and src.members == [8] * (n - 1) + [5], path
        out, _ = read(cfg, 40)
        assert (out == ref).all(), path
        head, state = read(cfg, 17)
        assert any(member > 0 and offset > 0 for lane in state["lane_state"] for _, _, member, offset in lane["pos"])
        tail, _ = read(cfg, 23, state)
        assert (np.concatenate([head, tail]) == ref).all(), path
    assert all(k.startswith("train_b/") for k in http.requests)


def test_remote_start_up_checks(data, http, s3, tmp_path, monkeypatch):
    with pytest.raises(BigtrainError, match=rf"^{http.url}/train_b/manifest.json: shards hold seq_len 32, but "
                                            r"model.seq_length is 64$"):
        build_train_source(make_cfg(f"{http.url}/train_b/", seq=64))
    with pytest.raises(BigtrainError, match=rf"^data source {http.url}/nothing/: no manifest.json"):
        open_source(f"{http.url}/nothing/")
    with pytest.raises(BigtrainError, match=r"^s3://nosuchbucket/x/manifest.json: no such bucket 'nosuchbucket'$"):
        open_source("s3://nosuchbucket/x/")
    with pytest.raises(BigtrainError, match=r"^data source gs://b/x.tar: unsupported scheme 'gs:'"):
        open_source("gs://b/x.tar")
    port = helpers.free_port()  # nothing listens there
    t = time.monotonic()
    with pytest.raises(BigtrainError, match=rf"^http://127.0.0.1:{port}/d/manifest.json: cannot connect .*refused.* "
                                            r"\(after 2 retries\)$"):
        open_source(f"http://127.0.0.1:{port}/d/shard-{{0..3}}.tar", reading=ReadOptions(**FAST))
    assert time.monotonic() - t < 5
    # an S3 endpoint that accepts connections and never answers: the stall timeout, per attempt
    hole = serve(str(tmp_path))
    hole.faults["*"] = lambda n: ("stall", 0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", hole.url)
    try:
        t = time.monotonic()
        with pytest.raises(BigtrainError, match=r"^s3://shards/train_b/manifest.json: no data for 1 s "
                                                r"\(data.stall_timeout\) \(after 2 retries\)$"):
            open_source(f"{s3}/train_b/", reading=ReadOptions(**FAST))
        assert 3 <= time.monotonic() - t < 10
        assert hole.requests["shards/train_b/manifest.json"] == 3
    finally:
        stop(hole)


# ---------------------------------------------------------------------------------------------- faults

CUT, STALL = "cut", "stall"


@pytest.mark.parametrize("fault, ranges, lost, requests", [
    (lambda n, at: (CUT, at) if n == 0 else None, True, 0, 2),          # resumed at the byte reached
    (lambda n, at: (CUT, at) if n == 0 else None, False, 5, 2),         # no Range: lost from the broken member
    (lambda n, at: (CUT, at), True, 5, 3),                              # dies every time: after 2 retries
    (lambda n, at: (STALL, at) if n == 0 else None, True, 0, 2),
    (lambda n, at: (STALL, at), True, 5, 3),
    (lambda n, at: ("status", 404), True, 8, 1),                        # missing: no retry
    (lambda n, at: ("status", 503) if n < 2 else None, True, 0, 3),
    (lambda n, at: ("status", 503), True, 8, 3),
], ids=["cut-once", "cut-no-range", "cut-always", "stall-once", "stall-always", "404", "503-twice", "503-always"])
def test_http_faults_are_retried_or_counted_with_the_members_lost(http, local_three, caplog, fault, ranges, lost,
                                                                  requests):
    """Shard 1 of three (8 members) breaks inside its 4th member: a resumed read loses nothing, a lost one
    counts the 5 members the manifest says were left (all 8 when nothing could be read)."""
    ref, at = local_three
    http.ranges = ranges
    http.faults["shard-000001.tar"] = lambda n: fault(n, at)
    t = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bigtrain.data"):
        rows, state = read_plain(f"{http.url}/train_b/{THREE}", 24 - lost)
    elapsed = time.monotonic() - t
    assert (rows == (without(ref, 1, 8 - lost, lost) if lost else ref)).all()
    assert state["skipped"] == lost and http.requests["train_b/shard-000001.tar"] == requests
    stalls = sum(1 for n in range(requests) if (fault(n, at) or ("",))[0] == STALL)  # 1 s each (stall_timeout)
    assert stalls <= elapsed < 4 + 1.5 * stalls
    if lost:
        assert f"{http.url}/train_b/shard-000001.tar (from member {8 - lost})" in caplog.text


def test_s3_missing_objects_are_counted_not_retried(s3, local_three, caplog):
    """holes/ lacks shard 1 but has the manifest: its 8 members count; bare/ has no manifest: it counts as one
    member (the documented undercount). A missing object is not retried (a retry would wait 30 s here)."""
    ref, _ = local_three
    t = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bigtrain.data"):
        rows, state = read_plain(f"{s3}/holes/{THREE}", 16, retry_backoff=30)
    assert (rows == without(ref, 1, 0, 8)).all() and state["skipped"] == 8
    assert f"{s3}/holes/shard-000001.tar (from member 0): ShardReadError: no such object" in caplog.text
    rows, state = read_plain(f"{s3}/bare/{THREE}", 16, retry_backoff=30)
    assert (rows == without(ref, 1, 0, 8)).all() and state["skipped"] == 1
    assert time.monotonic() - t < 25  # one retry would have waited 30 s


# ---------------------------------------------------------------------------------------------- pipe:

def test_pipe_failures_are_errors_and_a_stalled_pipe_is_stopped(data, tmp_path, local_three, caplog):
    """A good shard, a tar cut at a member boundary (it reads cleanly up to there), a command that exits 3 after a
    whole shard, `false` and a command that never writes: four errors, counted; the stall ends after
    data.stall_timeout."""
    ref, _ = local_three
    d = data["train_b"]
    cut = str(tmp_path / "cut.tar")
    shutil.copy(os.path.join(d, "shard-000001.tar"), cut)
    with open(cut, "r+b") as f:
        f.truncate(npy_members(cut)[4].offset)  # the 5th member's header: 4 whole members remain
    path = (f"pipe:{{cat {d}/shard-000000.tar,cat {cut},sh -c 'cat {d}/shard-000002.tar; exit 3',false,"
            f"sleep 30}}")
    t = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bigtrain.data"):
        rows, state = read_plain(path, 21)
    assert time.monotonic() - t < 6
    assert (rows == np.concatenate([ref[:128 + 64], ref[256:], ref[:16]])).all()
    assert state["skipped"] == 4
    text = caplog.text
    assert f"cat {cut} (from member 4): ShardReadError: truncated: the tar ends after" in text
    assert "exit 3' (from member 8): ShardReadError: the command exited with status 3" in text
    assert "false (from member 0): ShardReadError: the command exited with status 1" in text
    assert "sleep 30 (from member 0): ShardReadError: no output for 1 s (data.stall_timeout)" in text


# ---------------------------------------------------------------------------------------------- data.prepare

def test_prepare_refuses_a_remote_source_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", os.devnull, "data.prepare=stdlib",
                           "data.sources=[{path: http://127.0.0.1:9/stdlib/}]", "data.tokenizer=tok.model"],
                          cwd=tmp_path, env=helpers.clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "bigtrain: error: config key 'data.prepare': data.sources[0].path is http://127.0.0.1:9/stdlib/, not a local "
        "path: data.prepare=stdlib writes its tokenizer and shards to local paths (write shards with `bigtrain "
        "shards`, upload them, and drop data.prepare)"]
    assert os.listdir(tmp_path) == []
