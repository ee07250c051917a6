"""The fast path of CSV validation: pyarrow's multithreaded parser, numpy checks.

Why two paths: Python's ``csv`` module and per-cell checks run at ~40k rows/s
on a 25-column table here, a twentieth of pyarrow's parse rate
(``bench/data.py``). pyarrow cannot say which physical *line* a bad cell is
on, though, and partner IT needs that. So this path only ever *accepts*: it
reads the file with pyarrow, checks every value with the same rules as
:mod:`fedvault.encoding`, and returns ``None`` at the first doubt (a parse
error, a value that fails a check, a header that needs care). The exact path
in :mod:`clients.data` then reads the file again and reports the first problem
with file, line and column. A valid file pays one pyarrow pass; an invalid
one pays both.

A file with a double quote anywhere takes the exact path: pyarrow's quoting
is lenient where RFC 4180 is not. Agreement with the exact path otherwise:
the same missing-value markers (as pyarrow
nulls), cells stripped before lookup for text columns, numbers read by
pyarrow's float parser with non-finite values sent back to the exact path
(which names them); category, boolean and label lookups go through each
*distinct* text value once, with the exact path's own rules.
``tests/test_data_validation.py`` runs every file through both and compares.
"""

from __future__ import annotations

import csv
import io
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from clients.data import detect_delimiter
from clients.rows import IN_MEMORY, RowSink, Storage
from fedvault.encoding import InvalidValue, apply_missing, encoding_for
from fedvault.schema import FALSE_WORDS, TRUE_WORDS, DataSchema, FeatureSpec

__all__ = ["load_with_arrow"]

_BLOCK_BYTES = 1 << 24
# Up to this size a file is parsed whole by pyarrow's multithreaded reader
# (2.4× the streaming reader's rate on 2 cores, bench/data.py).
WHOLE_FILE_BYTES = 32 << 20
# Larger files are parsed in chunks of whole lines of about this size (see
# _chunked_batches); memory holds one chunk's text and table at a time.
_CHUNK_BYTES = 32 << 20
_HEAD_LIMIT = 1 << 20
_LINE_LIMIT = 4 * _CHUNK_BYTES


class _Doubt(Exception):
    """Something the exact path must look at."""


def _header(path: Path, encoding: str, delimiter: str | None) -> tuple[list[str], str] | None:
    """The first non-blank line's cells and the delimiter, or None if unsure."""
    try:
        with path.open(encoding="utf-8-sig" if encoding == "utf-8" else encoding, newline="") as f:
            for line in f:
                if line.strip():
                    break
            else:
                return None
    except (OSError, UnicodeDecodeError, LookupError):
        return None
    if delimiter is None:
        delimiter = detect_delimiter(line)
    try:
        cells = next(csv.reader(io.StringIO(line, newline=""), delimiter=delimiter, strict=True))
    except (csv.Error, StopIteration):
        return None
    return cells, delimiter


def _lookup(
    dictionary: list[Any], decide: Any, indices: npt.NDArray[np.int64], null: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """Codes of dictionary-encoded text via ``decide`` per distinct value, and missing cells."""
    table = np.array([decide(v) for v in dictionary] or [0], dtype=np.float64)
    codes = table[np.where(null, 0, indices)]
    missing = null | np.isnan(codes)
    return codes, missing


def _text_feature(spec: FeatureSpec, column: Any, markers: frozenset[str]) -> npt.NDArray[Any]:
    import pyarrow as pa

    null = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if not isinstance(column, pa.DictionaryArray):
        raise _Doubt
    indices = np.asarray(column.indices.fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    dictionary = column.dictionary.to_pylist()
    if spec.type == "categorical":
        index = {c: float(i) for i, c in enumerate(spec.categories or ())}
        other = None if spec.other is None else index[spec.other]

        def decide(value: str) -> float:
            text = value.strip()
            if text in markers:
                return np.nan
            code = index.get(text, other)
            if code is None:
                raise _Doubt
            return code

        codes, missing = _lookup(dictionary, decide, indices, null)
        typed = np.where(missing, -1, codes).astype(np.int64)
    else:

        def decide(value: str) -> float:
            text = value.strip()
            if text in markers:
                return np.nan
            low = text.lower()
            if low in TRUE_WORDS:
                return 1.0
            if low in FALSE_WORDS:
                return 0.0
            raise _Doubt

        codes, missing = _lookup(dictionary, decide, indices, null)
        typed = codes
    apply_missing(spec, typed, missing)
    return typed


def _numeric_feature(spec: FeatureSpec, column: Any) -> npt.NDArray[np.float64]:
    """The column's typed values, checked in as few passes as the rules allow.

    Nulls (the missing markers) come out of pyarrow as NaN. One comparison
    against [min, max] is false for NaN and ±inf as well, so a column without
    nulls is checked by it alone; with nulls, a NaN that is not a null is a
    literal nan in the file, which the exact path names.
    """
    values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
    clip = spec.out_of_range == "clip"
    lo, hi = (-np.inf, np.inf) if clip else (spec.min, spec.max)
    if lo is None or hi is None:
        raise _Doubt
    with np.errstate(invalid="ignore"):
        inside = (values >= lo) & (values <= hi)
    nulls = column.null_count
    if nulls:
        missing = np.isnan(values)
        if int(missing.sum()) != nulls or (~inside & ~missing).any():
            raise _Doubt
        if spec.missing == "refuse":
            raise _Doubt
        values = values.copy()
        apply_missing(spec, values, missing)
    elif not inside.all():
        raise _Doubt
    if spec.type == "int":
        with np.errstate(invalid="ignore"):
            fraction = np.mod(values, 1.0)
        if (fraction[~np.isnan(fraction)] != 0).any():
            raise _Doubt
    if clip:
        values = np.clip(values, spec.min, spec.max)
    return values


def _labels(schema: DataSchema, column: Any, markers: frozenset[str]) -> npt.NDArray[Any]:
    import pyarrow as pa

    if schema.is_regression:
        if column.null_count:
            raise _Doubt
        values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
        target = schema.target
        if target is None or not np.isfinite(values).all():
            raise _Doubt
        if target.out_of_range == "clip":
            return np.clip(values, target.min, target.max)
        if (values < target.min).any() or (values > target.max).any():
            raise _Doubt
        return values
    if column.null_count or not isinstance(column, pa.DictionaryArray):
        raise _Doubt
    index = {c: i for i, c in enumerate(schema.classes)}
    table = []
    for value in column.dictionary.to_pylist():
        code = index.get(value.strip())
        if code is None:
            raise _Doubt
        table.append(code)
    lookup = np.array(table or [0], dtype=np.int64)
    return lookup[np.asarray(column.indices.to_numpy(zero_copy_only=False), dtype=np.int64)]


def _has_quotes(path: Path) -> bool:
    """Whether the file has a double quote anywhere (a memchr per block: fast).

    pyarrow's parser is lenient where RFC 4180 is not (``"1"2`` reads as 12,
    an unterminated quote at the end is accepted), and a file with quotes
    must be refused exactly as the exact path refuses it: such files take the
    exact path.
    """
    try:
        with path.open("rb") as handle:
            while block := handle.read(_BLOCK_BYTES):
                if b'"' in block:
                    return True
    except OSError:
        return True
    return False


def _batches(
    path: Path, schema: DataSchema, encoding: str, delimiter: str | None
) -> tuple[Iterator[Any], int | None] | None:
    """Record batches of the file and, when it is read whole, their row count."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if _has_quotes(path):
        return None
    found = _header(path, encoding, delimiter)
    if found is None:
        return None
    header, delimiter = found
    wanted = set(schema.columns) | set(schema.ignore)
    if (
        len(set(header)) != len(header)
        or any(h != h.strip() or h not in wanted for h in header)
        or not set(schema.columns) <= set(header)
    ):
        return None  # the exact path names the header's problem
    text = pa.dictionary(pa.int32(), pa.string())
    types: dict[str, Any] = {}
    for spec in schema.features:
        types[spec.name] = pa.float64() if spec.numeric else text
    types[schema.label] = pa.float64() if schema.is_regression else text
    read = pacsv.ReadOptions(block_size=_BLOCK_BYTES, encoding=encoding)
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    convert = pacsv.ConvertOptions(
        column_types=types,
        include_columns=list(schema.columns),
        null_values=list(schema.missing_values),
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )
    batches: Iterator[Any]
    total: int | None = None
    try:
        if path.stat().st_size <= WHOLE_FILE_BYTES:
            table = pacsv.read_csv(
                path, read_options=read, parse_options=parse, convert_options=convert
            )
            batches = iter(table.to_batches())
            total = table.num_rows
        elif _splits_at_newlines(encoding):
            head = _head_bytes(path)
            if head is None:
                return None
            batches = _chunked_batches(path, head, read, parse, convert)
        else:
            batches = iter(
                pacsv.open_csv(
                    path, read_options=read, parse_options=parse, convert_options=convert
                )
            )
    except (pa.ArrowException, OSError):  # any pyarrow complaint: the exact path decides
        return None
    return batches, total


def _splits_at_newlines(encoding: str) -> bool:
    """Whether byte 0x0A is always a line end in this encoding (UTF-8, Latin-1,
    cp1252, ...: any ASCII-compatible one), so the file can be cut there."""
    try:
        return ",;\t|\r\n".encode(encoding) == b",;\t|\r\n" and "\n".encode(encoding) == b"\n"
    except (LookupError, UnicodeError):
        return False


def _head_bytes(path: Path) -> bytes | None:
    """The file's bytes up to and including its header line (blank lines before it too)."""
    with path.open("rb") as handle:
        start = handle.read(_HEAD_LIMIT)
    end = 0
    while True:
        cut = start.find(b"\n", end)
        if cut < 0:
            return None  # a header longer than the limit: the exact path reads it
        line = start[end:cut].strip().removeprefix(b"\xef\xbb\xbf")
        end = cut + 1
        if line.strip():
            return start[:end]


def _chunks(path: Path, head: bytes) -> Iterator[bytes]:
    """The file after its header in chunks of whole lines, each with the header before it."""
    with path.open("rb") as handle:
        handle.seek(len(head))
        leftover = b""
        while True:
            data = handle.read(_CHUNK_BYTES)
            if data:
                data = leftover + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    if len(data) > _LINE_LIMIT:
                        # No newline in megabytes (a file of bare \r line ends, or
                        # one endless line): the exact path streams it instead.
                        raise _Doubt
                    leftover = data
                    continue
                leftover, data = data[cut:], data[:cut]
            elif leftover:
                # A last line without a newline, even one of only blanks: pyarrow
                # judges it as it would in the whole file (same rows, same doubts).
                data, leftover = leftover, b""
            else:
                return
            yield head + data


def _hand_over(ready: queue.Queue[Any], stop: threading.Event, item: Any) -> None:
    """Put ``item`` for the consumer, unless it has gone (then drop it)."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _chunked_batches(path: Path, head: bytes, read: Any, parse: Any, convert: Any) -> Iterator[Any]:
    """Record batches of a large file, parsed a chunk of whole lines at a time.

    Why not ``pyarrow.csv.open_csv``: its reader reads ahead of the consumer
    without bound (measured here: the whole 400 MB file buffered before the
    fifth batch was used, with or without threads), so a node's memory would
    grow with its file. Here one thread parses the next chunk with the
    multithreaded ``read_csv`` (which releases the GIL) while the caller
    encodes the current one: at most two chunks' tables exist at once. The
    cut at a newline is safe because files with quotes (where a newline may
    sit inside a value) never take this path, and only encodings where byte
    0x0A is a newline do.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    ready: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in _chunks(path, head):
                table = pacsv.read_csv(
                    pa.BufferReader(chunk),
                    read_options=read,
                    parse_options=parse,
                    convert_options=convert,
                )
                del chunk
                _hand_over(ready, stop, table)
                if stop.is_set():
                    return
            _hand_over(ready, stop, None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            _hand_over(ready, stop, exc)

    worker = threading.Thread(target=produce, name="fedvault-csv-chunks", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item.to_batches()
            del item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                continue
        worker.join()


def load_with_arrow(
    path: Path,
    schema: DataSchema,
    encoding: str,
    delimiter: str | None,
    storage: Storage = IN_MEMORY,
) -> tuple[RowSink, list[npt.NDArray[Any]]] | None:
    """Encoded rows and label blocks of a *valid* file, or None when the exact path
    must decide (then nothing of the file is kept)."""
    try:
        import pyarrow
    except ImportError:  # pragma: no cover - a dependency of fedvault
        return None
    if any(spec.is_placeholder for spec in schema.features):
        return None
    found = _batches(path, schema, encoding, delimiter)
    if found is None:
        return None
    batches, total = found
    enc = encoding_for(schema)
    markers = frozenset(schema.missing_values)
    # A file read whole has a known row count: within the memory budget its
    # batches are encoded into one preallocated array (no concatenating copy).
    sink = storage.sink(enc.width, expected_rows=total)
    labels: list[npt.NDArray[Any]] = []
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            typed = []
            for spec in schema.features:
                column = batch.column(spec.name)
                if spec.numeric:
                    typed.append(_numeric_feature(spec, column))
                else:
                    typed.append(_text_feature(spec, column, markers))
            labels.append(_labels(schema, batch.column(schema.label), markers))
            sink.commit(enc.encode(typed, sink.buffer(batch.num_rows)))
    except (_Doubt, InvalidValue, pyarrow.ArrowException, OSError):
        # Parse/convert errors and doubts: the exact path names the problem.
        sink.discard()
        return None
    except BaseException:
        sink.discard()
        raise
    finally:
        # The chunked reader's thread stops now, not when a traceback that
        # holds this frame is dropped (it would keep a parsed chunk meanwhile).
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    if sink.rows == 0:
        return None  # no rows: the exact path says so with a line number
    return sink, labels
