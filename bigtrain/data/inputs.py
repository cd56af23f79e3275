"""The text inputs of `bigtrain shards` and `bigtrain tokenizer train`, and how `bigtrain shards` hands them to
its tokenizer processes.

Formats, by file name:

    *.txt (any other name)       one document: the whole file (UTF-8; undecodable bytes become U+FFFD)
    *.jsonl, *.ndjson            one document per non-blank line, in the field --text-key (default "text")
    *.parquet                    one document per row, in the string column --text-key; read a row group at a time
    + .gz, .zst / .zstd          gzip or zstd (Zstandard, streamed; several frames allowed) compression of a
                                 text or jsonl file (parquet compresses inside the file: not around it)

`iter_documents(path, text_key)` yields the documents of one file in order (the reference: tokenizer training
reads it). `plan_tasks` cuts a list of files into tasks of about CHUNK bytes of text for the tokenizer processes,
in input order, and `run_task` (in a tokenizer process, after `init_worker`) turns one into (ids, documents): the
ids of its documents, each followed by EOS, in one array of the shards' dtype. The main process reads as little
as it can: plain text files and byte ranges of uncompressed jsonl are read by the workers themselves; the main
process decompresses .gz/.zst streams (sequential by nature; cheap next to tokenizing) and reads parquet batches
(Arrow arrays travel to the workers without per-document pickling). A text file larger than CHUNK is read by the
main process and cut into pieces that are tokenized in parallel, where the tokenizer proves that the cut changes
no id (`Tokenizer.pieces`); otherwise it is one task.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import zlib

import numpy as np

from ..errors import BigtrainError

CHUNK = 1 << 18  # bytes (about characters) of text per task: small enough that the last tasks end together
MIN_PIECE = 1 << 16  # the smallest piece a large document is cut into
_JSONL = (".jsonl", ".ndjson")
_ZSTD = (".zst", ".zstd")


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def input_format(path: str) -> tuple[str, str | None]:
    """(kind, compression) of an input file by its name: kind 'text', 'jsonl' or 'parquet'; compression None,
    'gzip' or 'zstd'."""
    comp, base = None, path
    if path.endswith(".gz"):
        comp, base = "gzip", path[:-3]
    elif path.endswith(_ZSTD):
        comp, base = "zstd", path[:path.rfind(".")]
    if base.endswith(".parquet"):
        if comp:
            raise BigtrainError(f"input {path}: a parquet file compresses its own pages; give the .parquet file, "
                                f"not a {comp} stream of it")
        return "parquet", None
    return ("jsonl" if base.endswith(_JSONL) else "text"), comp


# ---------------------------------------------------------------------------------------------- raw bytes

def _zstd_chunks(f, path: str, size: int):
    """Decompressed bytes of a zstd stream (one frame or several, e.g. from `cat a.zst b.zst`); a stream that
    stops inside a frame is an error, where zstandard's own stream reader would return the part it has."""
    try:
        import zstandard
    except ImportError:
        raise BigtrainError(f"input {path}: reading .zst needs the 'zstandard' package "
                            "(pip install zstandard)") from None
    dctx = zstandard.ZstdDecompressor()
    d, fed = dctx.decompressobj(), False
    try:
        while data := f.read(size):
            while data:
                fed = True
                out = d.decompress(data)
                if out:
                    yield out
                if not d.eof:
                    break
                data, d, fed = d.unused_data, dctx.decompressobj(), False
    except zstandard.ZstdError as e:
        raise BigtrainError(f"cannot read input {path}: not a valid zstd stream ({_first_line(e)})") from None
    if fed:
        raise BigtrainError(f"cannot read input {path}: the zstd stream ends inside a frame (a truncated file?)")


def raw_chunks(path: str, size: int | None = None):
    """The (decompressed) bytes of an input file, in pieces of up to about `size` (default CHUNK) bytes."""
    comp, size = input_format(path)[1], size or CHUNK
    try:
        with open(path, "rb") as f:
            if comp == "zstd":
                yield from _zstd_chunks(f, path, size)
                return
            g = gzip.GzipFile(fileobj=f) if comp == "gzip" else f
            while data := g.read(size):
                yield data
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, OSError) and e.strerror:  # the file system's error
            raise BigtrainError(f"cannot read input {path}: {e.strerror}") from None
        raise BigtrainError(f"cannot read input {path}: not a valid {comp} stream ({_first_line(e)})") from None


def read_text(path: str) -> str:
    """A text input file as one document."""
    return b"".join(raw_chunks(path)).decode("utf-8", errors="replace")


def _line_blobs(path: str):
    """(bytes, first line number) of a jsonl input in pieces of whole lines of about CHUNK bytes. Lines end at
    '\\n', '\\r' or '\\r\\n' (Python's universal newlines, as a text-mode file reads them); a piece ends after a
    '\\n'."""
    rest, line = b"", 1
    for data in raw_chunks(path):
        data = rest + data
        cut = data.rfind(b"\n") + 1
        if not cut:
            rest = data
            continue
        blob, rest = data[:cut], data[cut:]
        yield blob, line
        line += _count_lines(blob)
    if rest:
        yield rest, line


def _count_lines(blob: bytes) -> int:
    """Lines in `blob`, which ends with a newline."""
    return blob.count(b"\n") + blob.count(b"\r") - blob.count(b"\r\n")


def jsonl_field(line: str, where: str, key: str, what: str = "field"):
    """Field `key` of one jsonl line, or one line naming `where` and what is wrong."""
    try:
        return json.loads(line)[key]
    except json.JSONDecodeError as e:
        raise BigtrainError(f"{where}: not valid JSON ({e.msg})") from None
    except (KeyError, TypeError, IndexError):
        raise BigtrainError(f"{where}: no {what} {key!r} (set --text-key)") from None


def _jsonl_text(line: str, where: str, key: str):
    text = jsonl_field(line, where, key, "text field")
    if not isinstance(text, str):
        raise BigtrainError(f"{where}: field {key!r} is {type(text).__name__}, expected a string")
    return text


def _blob_lines(blob: bytes, line: int):
    """("number", text) of the non-blank lines of a piece of jsonl that starts at line `line`."""
    for n, s in enumerate(io.StringIO(blob.decode("utf-8", errors="replace"), newline=""), line):
        if s.strip():
            yield n, s


def _jsonl_docs(blob: bytes, path: str, line: int, key: str) -> list[str]:
    return [_jsonl_text(s, f"{path}:{n}", key) for n, s in _blob_lines(blob, line)]


def jsonl_records(path: str, key: str):
    """("path:line", field `key`) of each non-blank line of a jsonl input (plain, .gz or .zst)."""
    for blob, line in _line_blobs(path):
        for n, s in _blob_lines(blob, line):
            where = f"{path}:{n}"
            yield where, jsonl_field(s, where, key)


# ---------------------------------------------------------------------------------------------- parquet

def _parquet(path: str, key: str):
    """The ParquetFile, its text column checked: present and of a string type."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise BigtrainError(f"cannot read input {path}: not a valid parquet file ({_first_line(e)})") from None
    schema = pf.schema_arrow
    if key not in schema.names:
        raise BigtrainError(f"{path}: no column {key!r} (columns: {', '.join(schema.names) or 'none'}; set "
                            "--text-key)")
    t = schema.field(key).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)):
        raise BigtrainError(f"{path}: column {key!r} is {schema.field(key).type}, expected a string column")
    return pf


def parquet_batches(path: str, key: str, rows_per_batch: int | None = None):
    """(Arrow string array, first row) of the text column of a parquet file, a row group at a time, in batches
    of about CHUNK bytes of text; a null value is an error naming its row (counted from 0)."""
    import pyarrow as pa
    pf = _parquet(path, key)
    md = pf.metadata
    if rows_per_batch is None:  # about CHUNK bytes of text per batch, from the column's size in the footer
        leaf = [i for i in range(md.num_columns) if md.schema.column(i).path == key]
        size = sum(md.row_group(g).column(leaf[0]).total_uncompressed_size for g in range(md.num_row_groups)) \
            if leaf else 0
        rows_per_batch = max(1, int(CHUNK * md.num_rows / size)) if size else 1024
    row = 0
    for g in range(pf.num_row_groups):
        try:
            for batch in pf.iter_batches(batch_size=rows_per_batch, row_groups=[g], columns=[key],
                                         use_threads=False):
                a = batch.column(0)
                if pa.types.is_dictionary(a.type):
                    a = a.dictionary_decode()
                if a.null_count:
                    i = next(i for i, v in enumerate(a.is_valid().to_pylist()) if not v)
                    raise BigtrainError(f"{path}: row {row + i} (from 0): column {key!r} is null, expected a string")
                yield from _slices(a, row)
                row += len(a)
        except (pa.ArrowException, OSError) as e:
            raise BigtrainError(f"cannot read input {path}: row group {g} (rows from {row}): "
                                f"{_first_line(e)}") from None


def _slices(a, row: int):
    """(array, first row) pieces of about CHUNK bytes of text of a string array, each compact (a pickled slice
    would carry its parent's whole buffers)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    cum = np.cumsum(pc.binary_length(a).to_numpy(zero_copy_only=False), dtype=np.int64)
    cuts = [0]
    if len(a) and cum[-1] > CHUNK * 3 // 2:
        cuts += sorted({int(c) + 1 for c in np.searchsorted(cum, np.arange(CHUNK, cum[-1], CHUNK))} - {0, len(a)})
    cuts.append(len(a))
    for s, e in zip(cuts, cuts[1:]):
        part = a.slice(s, e - s)
        yield (pa.concat_arrays([part]) if part.get_total_buffer_size() > part.nbytes * 5 // 4 else part), row + s


# ---------------------------------------------------------------------------------------------- documents

def iter_documents(path: str, text_key: str = "text"):
    """The documents of one input file, in order: the whole file for text, one per non-blank line (field
    `text_key`) for jsonl, one per row (column `text_key`) for parquet."""
    kind = input_format(path)[0]
    if kind == "text":
        yield read_text(path)
    elif kind == "jsonl":
        for blob, line in _line_blobs(path):
            yield from _jsonl_docs(blob, path, line, text_key)
    else:
        for a, _ in parquet_batches(path, text_key):
            yield from a.to_pylist()


# ---------------------------------------------------------------------------------------------- tasks

def plan_tasks(files, text_key: str, tok, workers: int):
    """The tasks (small tuples) that tokenize `files` in order; `run_task` of each, concatenated, gives the ids
    of every document in order, each followed by EOS. `tok` (the main process's tokenizer) cuts large text
    documents where it can do so exactly."""
    group, size = [], 0  # small text files, read and tokenized together by one worker
    for path in files:
        kind, comp = input_format(path)
        if kind == "text":
            try:
                n = os.path.getsize(path)
            except OSError as e:
                raise BigtrainError(f"cannot read input {path}: {e.strerror}") from None
            if n <= CHUNK or not tok.can_cut:
                group.append(path)
                size += n
                if size >= CHUNK:
                    yield ("files", group)
                    group, size = [], 0
                continue
        if group:
            yield ("files", group)
            group, size = [], 0
        if kind == "text":  # one large document: cut it where the ids provably stay the same
            text = read_text(path)
            pieces = tok.pieces(text, max(MIN_PIECE, min(CHUNK, len(text) // (4 * workers))))
            for i, p in enumerate(pieces):
                yield ("piece", p, i == len(pieces) - 1)
        elif kind == "jsonl" and comp is None:
            for start, end in _line_ranges(path):
                yield ("lines", path, start, end)
        elif kind == "jsonl":
            for blob, line in _line_blobs(path):
                yield ("blob", path, blob, line)
        else:
            for a, row in parquet_batches(path, text_key):
                yield ("arrow", path, a, row)
    if group:
        yield ("files", group)


def _line_ranges(path: str):
    """Byte ranges of an uncompressed jsonl file of about CHUNK bytes, each ending after a '\\n'."""
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            start = 0
            while start < end:
                f.seek(min(start + CHUNK, end) - 1)
                f.readline()
                stop = min(f.tell(), end)
                yield start, stop
                start = stop
    except OSError as e:
        raise BigtrainError(f"cannot read input {path}: {e.strerror}") from None


def _lines_before(path: str, offset: int) -> int:
    """The number of the line that starts at byte `offset` (just after a '\\n') of an uncompressed file."""
    n, cr = 1, False
    with open(path, "rb") as f:
        while offset > 0 and (data := f.read(min(offset, 1 << 24))):
            offset -= len(data)
            n += _count_lines(data) - (cr and data.startswith(b"\n"))  # '\r\n' across two reads: one line end
            cr = data.endswith(b"\r")
    return n


_tok = _eos = _dtype = _key = None


def init_worker(tokenizer: str, eos: int | None, dtype: str, text_key: str) -> None:
    """Set up a tokenizer process (also the main process when there is one worker)."""
    global _tok, _eos, _dtype, _key
    from .tokenizer import load_tokenizer
    _tok, _eos, _dtype, _key = load_tokenizer(tokenizer), eos, np.dtype(dtype), text_key


def run_task(task) -> tuple[np.ndarray, int]:
    """(ids of the task's documents, each followed by EOS, as one array; number of documents completed)."""
    kind, key = task[0], _key
    if kind == "piece":  # a piece of a large document: EOS after the last one
        _, text, last = task
        return _tok.encode_many([text], _eos if last else None, _dtype), int(last)
    if kind == "files":
        docs = [read_text(p) for p in task[1]]
    elif kind == "lines":
        _, path, start, end = task
        try:
            with open(path, "rb") as f:
                f.seek(start)
                blob = f.read(end - start)
        except OSError as e:
            raise BigtrainError(f"cannot read input {path}: {e.strerror}") from None
        try:
            docs = _jsonl_docs(blob, path, 1, key)
        except BigtrainError:  # the message needs the line number in the file: count the lines before
            docs = _jsonl_docs(blob, path, _lines_before(path, start), key)
    elif kind == "blob":
        _, path, blob, line = task
        docs = _jsonl_docs(blob, path, line, key)
    else:
        docs = task[2].to_pylist()
    return _tok.encode_many(docs, _eos, _dtype), len(docs)

