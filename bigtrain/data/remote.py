"""Where a shard's bytes come from: a local file, `http://` / `https://` (urllib3), `s3://bucket/key` (boto3) or a
`pipe:` shell command, each read front to back as a `ShardStream`, the file object webdataset's tar iterator
reads. Every read is bounded in time and in retries (`ReadOptions`: data.stall_timeout, data.connect_timeout,
data.retries, data.retry_backoff):

- a read that receives no byte for `stall_timeout` seconds fails (HTTP and S3: the socket read timeout; a
  `pipe:` command is killed, with the processes it started);
- a transient failure (connection refused or reset, a timeout, HTTP 408/429/5xx, S3 throttling, a response cut
  short of its Content-Length) is retried at most `retries` times per shard, after `retry_backoff` x 1, 2, 4, ...
  seconds; a read that broke mid-shard resumes at the byte it reached (HTTP `Range` + `If-Range`, S3 ranged GET +
  `If-Match`), so the tar iterator never notices. A server that cannot resume, a missing object (HTTP 404/410,
  S3 NoSuchKey) and every other error fail at once; `pipe:` commands are never retried;
- a shard is whole only when every byte arrived, its `pipe:` command exited with status 0 and the tar ends with
  its end-of-archive blocks (`finish()`; a tar cut at a member boundary would otherwise read without error).

A failure is a `ShardReadError` (an OSError, message without the URL): the loader skips the shard's lost members
and counts them (members.Cursor); `fetch()` (a remote manifest.json at start-up) makes it a one-line
BigtrainError naming the URL. urllib3 and boto3 are imported on first use.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import BigtrainError

log = logging.getLogger("bigtrain.data")
CHUNK = 1 << 18  # most bytes asked of a transport at once
TAR_END = 1024   # a tar archive ends with two zero blocks of 512 bytes
REMOTE = ("http", "https", "s3")  # the URL schemes read here (besides local paths and pipe:)


@dataclass(frozen=True)
class ReadOptions:
    """How shards are read (see DataConfig: stall_timeout, connect_timeout, retries, retry_backoff)."""
    stall_timeout: float = 60.0
    connect_timeout: float = 10.0
    retries: int = 3
    retry_backoff: float = 1.0

    @classmethod
    def of(cls, data) -> "ReadOptions":
        """The options of a DataConfig."""
        return cls(data.stall_timeout, data.connect_timeout, data.retries, data.retry_backoff)

    def give_up_seconds(self) -> float:
        """The longest one shard read may go on before it is given up: every try connecting and then stalling,
        with the backoff between tries (the hang watchdog's step budget allows for it)."""
        return (self.retries + 1) * (self.connect_timeout + self.stall_timeout) + \
            self.retry_backoff * (2 ** self.retries - 1)


class ShardReadError(OSError):
    """A shard or manifest that could not be read. `transient` failures are worth a retry; `missing`: the object
    does not exist."""

    def __init__(self, message: str, transient: bool = False, missing: bool = False):
        super().__init__(message)
        self.transient, self.missing = transient, missing


# ---------------------------------------------------------------------------------------------- paths

def scheme(path: str) -> str:
    """'' for a local path, 'pipe' for a `pipe:` command, else the URL scheme ('http', 's3', ...)."""
    head = path.split("/")[0]
    return head.split(":")[0].lower() if ":" in head else ""


def is_dir_url(path: str) -> bool:
    """An http(s) or S3 URL that names a directory (it ends in '/'): shards listed by the manifest.json under it."""
    return scheme(path) in REMOTE and path.endswith("/")


def join(base: str, name: str) -> str:
    """`name` inside the local or remote directory `base`."""
    return f"{base.rstrip('/')}/{name}" if scheme(base) else os.path.join(base, name)


def check_url(url: str) -> None:
    """A one-line error for a URL that cannot be read here (checked at start-up, before any read)."""
    s = scheme(url)
    if s == "pipe":
        if not url[5:].strip():
            raise BigtrainError(f"data source {url}: a pipe: source needs a command (pipe:COMMAND)")
    elif s in ("http", "https"):
        if not urlsplit(url).hostname:
            raise BigtrainError(f"data source {url}: no host in the URL (expected {s}://HOST/PATH)")
    elif s == "s3":
        bucket, key = s3_split(url)
        if not bucket or not (key or url.endswith("/")):
            raise BigtrainError(f"data source {url}: expected s3://BUCKET/KEY")
    elif s:
        raise BigtrainError(f"data source {url}: unsupported scheme '{s}:' (local paths, http://, https://, s3:// and "
                            f"pipe:COMMAND are; read another store through a pipe: command)")


def s3_split(url: str) -> tuple[str, str]:
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def open_shard(url: str, opts: ReadOptions) -> "ShardStream":
    """The stream of one shard (or manifest); nothing is read until the first `read()`."""
    s = scheme(url)
    cls = {"": LocalStream, "pipe": PipeStream, "http": HttpStream, "https": HttpStream, "s3": S3Stream}.get(s)
    if cls is None:
        check_url(url)
    return cls(url, opts)


def fetch(url: str, opts: ReadOptions) -> bytes | None:
    """The whole object at `url` (a manifest.json), None when it does not exist; any other failure is a one-line
    BigtrainError naming the URL."""
    stream = open_shard(url, opts)
    try:
        return stream.read()
    except ShardReadError as e:
        if e.missing:
            return None
        raise BigtrainError(f"{url}: {e}") from None
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------- streams

class ShardStream:
    """One object's bytes, front to back: `read(n)` gives n bytes unless the object ends first. Remote transports
    define `_open()` (at byte `self.pos`, setting `self._body`), `_chunk(k)` (up to k bytes, b'' at the end) and
    `_release()`, and raise ShardReadError; the retries are here."""
    resumable = False  # whether a read that broke mid-object may reopen at the byte reached

    def __init__(self, url: str, opts: ReadOptions):
        self.url, self.opts = url, opts
        self.pos = 0        # bytes received (those delivered and those in self._ahead)
        self.size = None    # the object's size, where the transport says it
        self.tries = 0      # retries used
        self.tail = b""     # the last TAR_END bytes delivered
        self._body = None
        self._ahead, self._off = b"", 0  # bytes received, delivered up to self._off
        self._failure = None  # a failure not raised yet (bytes before it were returned first)

    def __str__(self) -> str:  # webdataset appends " @ <stream>" to an error inside a member
        return f"byte {self.pos - len(self._ahead) + self._off}"

    def read(self, n: int = -1) -> bytes:
        """n bytes (all with n < 0), fewer at the end. Transports are asked for CHUNK bytes at a time, the rest
        kept for the next calls. A failure after some bytes returns those first (the tar iterator gets every
        member that arrived whole) and is raised by the next call."""
        ahead = len(self._ahead) - self._off
        if 0 <= n <= ahead:
            data = self._ahead[self._off:self._off + n]
            self._off += n
        else:
            if self._failure is not None and not ahead:
                raise self._failure
            parts, got = ([self._ahead[self._off:]] if ahead else []), ahead
            self._ahead, self._off = b"", 0
            while (n < 0 or got < n) and self._failure is None:
                try:
                    chunk = self._next(CHUNK)
                except ShardReadError as e:
                    if not parts or n < 0:
                        raise
                    self._failure = e
                    break
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
                self.pos += len(chunk)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            if 0 <= n < len(data):
                self._ahead, self._off, data = data, n, data[:n]
        self.tail = (self.tail + data[-TAR_END:])[-TAR_END:]
        return data

    def finish(self) -> None:
        """After the tar iterator's last member: read the rest and check that the shard is a whole tar."""
        while self.read(CHUNK):
            pass
        tar_end(self.pos, self.tail)

    def close(self) -> None:
        if self._body is not None:
            try:
                self._release()
            finally:
                self._body = None

    def _next(self, k: int) -> bytes:
        while True:
            try:
                if self._body is None:
                    self._open()
                chunk = self._chunk(k)
                if not chunk and self.size is not None and self.pos < self.size:
                    raise ShardReadError(f"the response ended after {self.pos} of {self.size} bytes", transient=True)
                return chunk
            except ShardReadError as e:
                self._retry_or_raise(e)

    def _retry_or_raise(self, e: ShardReadError) -> None:
        self.close()
        if not e.transient or self.tries >= self.opts.retries or (self.pos and not self.resumable):
            if self.tries:
                raise ShardReadError(f"{e} (after {self.tries} {'retry' if self.tries == 1 else 'retries'})",
                                     e.transient, e.missing) from None
            raise e
        delay = self.opts.retry_backoff * 2 ** self.tries
        self.tries += 1
        log.warning("data: %s: %s at byte %d; retry %d of %d in %.1f s (data.retries)", self.url, e, self.pos,
                    self.tries, self.opts.retries, delay)
        time.sleep(delay)


def tar_end(size: int, tail: bytes) -> None:
    """A tar archive of `size` bytes ending in `tail` is whole: whole blocks, the last two zero."""
    if size % 512 or len(tail) < TAR_END or any(tail[-TAR_END:]):
        raise ShardReadError(f"truncated: the tar ends after {size} bytes, without its end-of-archive blocks")


class LocalStream(ShardStream):
    """A local file, read as it is (nothing to retry, no stall to watch); its end is checked in place."""

    def read(self, n: int = -1) -> bytes:
        try:
            if self._body is None:
                self._body = open(self.url, "rb")
            data = self._body.read(n)
        except OSError as e:
            raise ShardReadError(e.strerror or str(e), missing=isinstance(e, FileNotFoundError)) from None
        self.pos += len(data)
        return data

    def finish(self) -> None:
        size = os.fstat(self._body.fileno()).st_size
        self._body.seek(max(0, size - TAR_END))
        tar_end(size, self._body.read(TAR_END))

    def _release(self):
        self._body.close()


class PipeStream(ShardStream):
    """`pipe:COMMAND`: the command's standard output, run by the shell in a process group of its own (killed
    whole when it stalls or when reading stops early); its exit status must be 0."""

    def _open(self):
        self._err = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(self.url[5:], shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=self._err, start_new_session=True, bufsize=0)
        self._body = self._proc.stdout

    def _chunk(self, k):
        fd = self._body.fileno()
        if not select.select([fd], [], [], self.opts.stall_timeout)[0]:
            raise ShardReadError(f"no output for {self.opts.stall_timeout:g} s (data.stall_timeout): command stopped")
        data = os.read(fd, k)
        if not data:
            try:
                status = self._proc.wait(self.opts.stall_timeout)
            except subprocess.TimeoutExpired:
                raise ShardReadError(f"closed its output but still runs after {self.opts.stall_timeout:g} s "
                                     "(data.stall_timeout): command stopped") from None
            if status:
                how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
                raise ShardReadError(f"the command {how}{self._stderr()}")
        return data

    def _stderr(self) -> str:
        self._err.seek(0, os.SEEK_END)
        self._err.seek(max(0, self._err.tell() - 400))
        text = " ".join(self._err.read().decode("utf-8", "replace").split())
        return f": {text[-200:]}" if text else ""

    def _release(self):
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._body.close()
        self._err.close()


_POOL: tuple[int, object] | None = None  # (pid, urllib3.PoolManager): one per process


class HttpStream(ShardStream):
    """http(s):// with urllib3: connect timeout, read timeout = the stall timeout, no content decoding (the bytes
    as stored), Content-Length enforced; a retry resumes with `Range: bytes=POS-` (and `If-Range`: the same
    object), and a server that answers it with the whole object instead cannot resume."""
    resumable = True
    _validator = None  # ETag or Last-Modified of the first response

    def _open(self):
        import urllib3
        global _POOL
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), urllib3.PoolManager(num_pools=32))
        headers = {"Accept-Encoding": "identity"}
        if self.pos:
            headers["Range"] = f"bytes={self.pos}-"
            if self._validator:
                headers["If-Range"] = self._validator
        try:
            r = _POOL[1].request("GET", self.url, headers=headers, preload_content=False, decode_content=False,
                                 timeout=urllib3.Timeout(connect=self.opts.connect_timeout,
                                                         read=self.opts.stall_timeout),
                                 retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5))
        except urllib3.exceptions.HTTPError as e:
            raise self._error(e) from None
        self._body = r
        if r.status in (404, 410):
            raise ShardReadError(f"HTTP {r.status} {r.reason}: no such object", missing=True)
        if r.status != (206 if self.pos else 200):
            if r.status == 200:
                raise ShardReadError(f"cannot resume at byte {self.pos}: the server sent the whole object again (no "
                                     "Range support, or the object changed)")
            raise ShardReadError(f"HTTP {r.status} {r.reason}", transient=r.status in (408, 429) or r.status >= 500)
        if self.pos:
            got = r.headers.get("Content-Range", "")
            if not got.startswith(f"bytes {self.pos}-"):
                raise ShardReadError(f"asked for bytes {self.pos}- and got Content-Range {got!r}")
        else:
            length = r.headers.get("Content-Length")
            self.size = int(length) if length and length.isdigit() else None
            self._validator = r.headers.get("ETag") or r.headers.get("Last-Modified")
            if self._validator and self._validator.startswith("W/"):  # weak ETags cannot guard a range
                self._validator = r.headers.get("Last-Modified")

    def _chunk(self, k):
        import urllib3
        try:
            return self._body.read1(k)  # what has arrived: a stall then loses none of it
        except urllib3.exceptions.HTTPError as e:
            raise self._error(e) from None

    def _error(self, e) -> ShardReadError:
        from urllib3 import exceptions as u
        e = getattr(e, "reason", None) or e  # MaxRetryError wraps the cause
        if isinstance(e, u.NewConnectionError):
            what = f"cannot connect ({str(e).rsplit(': ', 1)[-1]})"
        elif isinstance(e, u.ConnectTimeoutError):
            what = f"no connection within {self.opts.connect_timeout:g} s (data.connect_timeout)"
        elif isinstance(e, u.ReadTimeoutError):
            what = f"no data for {self.opts.stall_timeout:g} s (data.stall_timeout)"
        else:
            what = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        return ShardReadError(what, transient=True)

    def _release(self):
        self._body.close()
        self._body.release_conn()


_S3: dict = {}  # boto3 clients by (pid, timeouts, AWS environment)
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION")


class S3Stream(ShardStream):
    """s3://bucket/key with boto3: endpoint, region and credentials from the standard AWS environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ..., or a profile); botocore's own retries off (ours apply), read timeout
    = the stall timeout; a retry resumes with a ranged GET of the same object (If-Match its ETag)."""
    resumable = True
    _etag = None

    def _open(self):
        from botocore.exceptions import BotoCoreError, ClientError
        bucket, key = s3_split(self.url)
        kw = dict(Bucket=bucket, Key=key)
        if self.pos:
            kw.update(Range=f"bytes={self.pos}-", IfMatch=self._etag)
        try:
            r = self._client().get_object(**kw)
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, bucket) from None
        self._body = r["Body"]
        if not self.pos:
            self.size, self._etag = r["ContentLength"], r["ETag"]

    def _client(self):
        o = self.opts
        k = (os.getpid(), o.connect_timeout, o.stall_timeout, *(os.environ.get(v) for v in _AWS_ENV))
        if k not in _S3:
            import boto3
            from botocore.config import Config
            _S3[k] = boto3.session.Session().client("s3", config=Config(
                connect_timeout=o.connect_timeout, read_timeout=o.stall_timeout,
                retries={"total_max_attempts": 1, "mode": "standard"}))
        return _S3[k]

    def _chunk(self, k):
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            return self._body.read(k)
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, "") from None

    def _error(self, e, bucket: str) -> ShardReadError:
        from botocore import exceptions as b
        if isinstance(e, b.ClientError):
            err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
            code, status = err.get("Code", ""), meta.get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "404", "NotFound"):
                return ShardReadError("no such object", missing=True)
            if code == "NoSuchBucket":
                return ShardReadError(f"no such bucket '{bucket}'")
            if code in ("PreconditionFailed", "412"):
                return ShardReadError(f"cannot resume at byte {self.pos}: the object changed while it was read")
            return ShardReadError(f"{code or status}: {err.get('Message', '')}".rstrip(": "),
                                  transient=status >= 500 or status in (408, 429) or code in (
                                      "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"))
        if isinstance(e, b.NoCredentialsError):
            return ShardReadError("no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                                  "AWS_PROFILE)")
        if isinstance(e, b.ReadTimeoutError):
            return ShardReadError(f"no data for {self.opts.stall_timeout:g} s (data.stall_timeout)", transient=True)
        if isinstance(e, b.ConnectTimeoutError):
            return ShardReadError(f"no connection within {self.opts.connect_timeout:g} s (data.connect_timeout)",
                                  transient=True)
        transient = isinstance(e, (b.ConnectionError, b.HTTPClientError, b.IncompleteReadError))
        return ShardReadError(str(e), transient=transient)

    def _release(self):
        self._body.close()
