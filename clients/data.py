"""Partner-side loading and validation of a local data file against the federation schema.

Runs on the partner node, so it imports only numpy and the standard library
(pyarrow only for Parquet files) to keep process start fast.

Every problem is reported as a :class:`~fedvault.errors.DataError` carrying the
file, the 1-based physical line (the header is line 1; for Parquet the row
group and row) and the column name of the *first* problem in file order (top to
bottom, then left to right). Messages may quote the single offending cell
(truncated to 40 characters) but never other rows' values.

CSV files:

* UTF-8 by default (an optional byte-order mark is ignored), or the declared
  encoding; RFC 4180 quoting, any line endings; the delimiter is declared or
  detected from the header line (``,``, ``;``, tab or ``|``);
* a header naming the schema's features and its label column, in any order
  (surrounding whitespace in names is ignored), plus any of the schema's
  ``ignore`` columns; any other column is refused;
* cells as :mod:`fedvault.encoding` parses them (numbers, declared categories,
  booleans, the schema's missing-value markers);
* blank lines are skipped (they still count for line numbers).

Validation streams: rows are read, checked and encoded in blocks of
:data:`BLOCK_ROWS`, so memory holds one block of text, never the whole
file's text; the encoded blocks go where the caller's
:class:`~clients.rows.Storage` says (memory, a spill file past a budget,
or nowhere when only validating).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from clients.rows import BLOCK_ROWS, IN_MEMORY, VALIDATE_ONLY, EncodedRows, RowSink, Storage
from fedvault.encoding import Encoding, InvalidValue, encoding_for, parse_cells, parse_labels
from fedvault.encoding import quote as _quote
from fedvault.errors import ConfigError, DataError
from fedvault.schema import DataSchema

__all__ = [
    "BLOCK_ROWS",
    "PARQUET_SUFFIXES",
    "CsvFormat",
    "PartnerData",
    "count_valid_rows",
    "iter_problems",
    "load_partner_csv",
    "load_partner_data",
]

_READ_BYTES = 1 << 22
_LIST_LIMIT = 5
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
_DELIMITERS = (",", ";", "\t", "|")


@dataclass(frozen=True, slots=True)
class CsvFormat:
    """How a partner's CSV is written: ``delimiter`` None means detect it."""

    delimiter: str | None = None
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if self.delimiter is not None and (len(self.delimiter) != 1 or self.delimiter in '"\r\n'):
            raise ConfigError(
                f"csv delimiter must be one character (not a quote), got {self.delimiter!r}"
            )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"unknown text encoding {self.encoding!r}") from None


@dataclass(frozen=True, slots=True, eq=False)
class PartnerData:
    """A validated partner table, encoded in schema order.

    ``rows`` is the model input (:class:`~fedvault.encoding.Encoding`), NaN
    where a ``mean``-imputed value is missing, in memory or spilled to the
    node's disk (:mod:`clients.rows`); ``labels`` are class indices
    (``int64``) or regression targets in their units (``float64``), always in
    memory. Loaded with ``VALIDATE_ONLY`` storage, ``rows`` is empty and only
    ``labels`` and ``n_rows`` say what the file held.
    """

    rows: EncodedRows
    labels: npt.NDArray[Any]
    path: Path

    @property
    def n_rows(self) -> int:
        return int(self.labels.shape[0])

    @property
    def features(self) -> npt.NDArray[np.float32]:
        """The whole encoded table as one array (a spilled one is read back)."""
        return self.rows.array()


def _names(names: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(_quote(n) for n in names[:_LIST_LIMIT])
    rest = len(names) - _LIST_LIMIT
    return shown + (f" and {rest} more" if rest > 0 else "")


def _check_header(header: list[str], schema: DataSchema, shown: str, line: int) -> dict[str, int]:
    """Map each schema column to its position in the file, or raise DataError."""
    expected = schema.columns
    wanted = set(expected) | set(schema.ignore)
    if not set(expected).intersection(header):
        # Probably no header at all; do not echo the line, it may be a row of data.
        raise DataError(
            f"no schema column names in the header, expected a header line naming "
            f"{_names(expected)} (any order)",
            path=shown,
            line=line,
        )
    positions: dict[str, int] = {}
    for pos, name in enumerate(header):
        if name in positions:
            raise DataError(
                f"duplicate column {_quote(name)} (first at position {positions[name] + 1}, "
                f"again at position {pos + 1})",
                path=shown,
                line=line,
                column=name,
            )
        positions[name] = pos
    extra = [name for name in header if name not in wanted]
    if extra:
        raise DataError(
            f"unexpected column(s) {_names(extra)}, not in schema {schema.name!r} "
            "(a column the federation does not use can be declared in the schema's ignore list)",
            path=shown,
            line=line,
            column=extra[0],
        )
    missing = [name for name in expected if name not in positions]
    if missing:
        raise DataError(
            f"missing column(s) {_names(missing)}, required by schema {schema.name!r}",
            path=shown,
            line=line,
            column=missing[0],
        )
    return positions


class _Block:
    """Rows of one block (text cells) and the physical line each starts on."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.lines: list[int] = []


def _text_lines(path: Path, fmt: CsvFormat, shown: str) -> Iterator[str]:
    """Decoded lines (with their line endings), read incrementally.

    A decoding error names its physical line: the newlines counted in the bytes
    before it, plus one.
    """
    name = codecs.lookup(fmt.encoding).name
    decoder = codecs.getincrementaldecoder("utf-8-sig" if name == "utf-8" else fmt.encoding)()
    label = "UTF-8" if name == "utf-8" else fmt.encoding
    newlines = 0
    consumed = 0
    leftover = ""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataError("file not found", path=shown) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected a CSV file", path=shown) from None
    except PermissionError:
        raise DataError("permission denied, cannot read the file", path=shown) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DataError(f"cannot read the file ({reason})", path=shown) from None
    with handle:
        while True:
            try:
                raw = handle.read(_READ_BYTES)
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise DataError(f"cannot read the file ({reason})", path=shown) from None
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                line = newlines + raw.count(b"\n", 0, max(exc.start, 0)) + 1
                raise DataError(
                    f"not valid {label} text (byte {consumed + max(exc.start, 0)}), "
                    f"expected a {label} CSV file (or declare its encoding)",
                    path=shown,
                    line=line,
                ) from None
            newlines += raw.count(b"\n")
            consumed += len(raw)
            buffer = leftover + text
            if not raw:
                if buffer:
                    yield buffer
                return
            lines = io.StringIO(buffer, newline="").readlines()
            # Keep an unfinished last line (or a lone \r that may be half of \r\n).
            if lines and (not lines[-1].endswith(("\n", "\r")) or lines[-1].endswith("\r")):
                leftover = lines.pop()
            else:
                leftover = ""
            yield from lines


def detect_delimiter(first: str) -> str:
    """The delimiter of a header line: the most frequent of ``, ; tab |`` (``,`` if none)."""
    counts = {d: first.count(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def _records(path: Path, fmt: CsvFormat, shown: str) -> Iterator[tuple[int, list[str]] | DataError]:
    """(start line, cells) of each non-blank record, or a structural DataError last."""
    lines = _text_lines(path, fmt, shown)
    first: str | None = None
    pending: list[str] = []
    for line in lines:
        pending.append(line)
        if line.strip():
            first = line
            break
    if first is None:
        return
    delimiter = fmt.delimiter or detect_delimiter(first)

    def replay() -> Iterator[str]:
        yield from pending
        yield from lines

    reader = csv.reader(replay(), delimiter=delimiter, strict=True)
    previous_end = 0
    while True:
        start = previous_end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield DataError(
                f"malformed CSV in the record starting here ({exc})", path=shown, line=start
            )
            return
        previous_end = reader.line_num
        if len(row) <= 1 and not "".join(row).strip():
            continue  # blank line
        yield start, row


class _Validator:
    """Checks and encodes blocks of rows; remembers the first problem per column."""

    def __init__(self, schema: DataSchema, positions: dict[str, int], shown: str) -> None:
        self.schema = schema
        self.encoding: Encoding = encoding_for(schema)
        self.positions = positions
        self.shown = shown
        self.missing = frozenset(schema.missing_values)
        self.specs = {spec.name: spec for spec in schema.features}

    def block(self, block: _Block) -> tuple[npt.NDArray[np.float32], npt.NDArray[Any]]:
        """Encoded block, or DataError at its first problem in file order.

        Columns are parsed whole (vectorised); only a block with a problem is
        rescanned to find which column's problem comes first in the file.
        """
        columns = list(zip(*block.rows, strict=True))
        try:
            typed = [self._parse(name, columns[self.positions[name]]) for name in self.specs]
            labels = self._parse(self.schema.label, columns[self.positions[self.schema.label]])
        except InvalidValue:
            raise self.problems(block)[0] from None
        return self.encoding.encode(typed), labels

    def problems(self, block: _Block) -> list[DataError]:
        """Each column's first problem in this block, in file order."""
        counts: dict[str, int] = {}
        return self.column_problems(block, counts, 1)

    def column_problems(
        self, block: _Block, counts: dict[str, int], per_column: int
    ) -> list[DataError]:
        """Each column's next problems in this block (``counts`` caps them per column),
        in file order: top to bottom, then left to right."""
        if not block.rows:
            return []
        columns = list(zip(*block.rows, strict=True))
        found: list[tuple[int, int, DataError]] = []
        for name in (*self.schema.feature_names, self.schema.label):
            cells = columns[self.positions[name]]
            offset = 0
            while counts.get(name, 0) < per_column and offset < len(cells):
                try:
                    self._parse(name, cells[offset:])
                    break
                except InvalidValue as exc:
                    row = offset + exc.row
                    error = DataError(
                        exc.message, path=self.shown, line=block.lines[row], column=name
                    )
                    found.append((row, self.positions[name], error))
                    counts[name] = counts.get(name, 0) + 1
                    offset = row + 1
        found.sort(key=lambda item: item[:2])
        return [error for _, _, error in found]

    def _parse(self, name: str, cells: tuple[str, ...]) -> npt.NDArray[Any]:
        if name == self.schema.label:
            return parse_labels(self.schema, cells)
        return parse_cells(self.specs[name], cells, self.missing)


def _csv_blocks(
    path: Path, schema: DataSchema, fmt: CsvFormat
) -> Iterator[tuple[_Validator, _Block, DataError | None]]:
    """Blocks of rows under a valid header. An error (structural, or a file
    without data rows) comes with the last block, after the rows above it."""
    shown = str(path)
    header_line = 1
    validator: _Validator | None = None
    width = 0
    total = 0
    block = _Block()
    for item in _records(path, fmt, shown):
        if isinstance(item, DataError):
            if validator is None:
                raise item
            yield validator, block, item
            return
        start, row = item
        if validator is None:
            header = [name.strip() for name in row]
            header_line = start
            width = len(header)
            validator = _Validator(schema, _check_header(header, schema, shown, start), shown)
            continue
        if len(row) != width:
            structural = DataError(
                f"expected {width} cells (one per header column), got {len(row)}",
                path=shown,
                line=start,
            )
            yield validator, block, structural
            return
        block.rows.append(row)
        block.lines.append(start)
        total += 1
        if len(block.rows) >= BLOCK_ROWS:
            yield validator, block, None
            block = _Block()
    if validator is None:
        raise DataError("file is empty, expected a header line", path=shown, line=1)
    if total == 0:
        empty = DataError(
            "no data rows, expected at least one row after the header",
            path=shown,
            line=header_line + 1,
        )
        yield validator, block, empty
    elif block.rows:
        yield validator, block, None


def load_partner_csv(
    path: Path | str,
    schema: DataSchema,
    fmt: CsvFormat | None = None,
    storage: Storage = IN_MEMORY,
) -> PartnerData:
    """Load and fully validate a partner CSV; raise DataError at the first problem."""
    path = Path(path)
    fmt = fmt or CsvFormat()
    from clients.arrow_csv import load_with_arrow

    fast = load_with_arrow(path, schema, fmt.encoding, fmt.delimiter, storage)
    if fast is not None:
        return finish(*fast, path)
    return load_exact(path, schema, fmt, storage)


def load_exact(
    path: Path, schema: DataSchema, fmt: CsvFormat, storage: Storage = IN_MEMORY
) -> PartnerData:
    """The exact path: Python's csv module, every problem located by line."""
    sink = storage.sink(encoding_for(schema).width)
    labels: list[npt.NDArray[Any]] = []
    try:
        for validator, block, error in _csv_blocks(path, schema, fmt):
            if block.rows:
                x, y = validator.block(block)
                sink.commit(x)
                labels.append(y)
            if error is not None:
                raise error
    except BaseException:
        sink.discard()
        raise
    return finish(sink, labels, path)


def finish(sink: RowSink, labels: list[npt.NDArray[Any]], path: Path) -> PartnerData:
    """One read-only table from a sink's rows and the labels' blocks."""
    y = labels[0] if len(labels) == 1 else np.concatenate(labels)
    y.flags.writeable = False
    return PartnerData(rows=sink.finish(), labels=y, path=path)


def load_partner_data(
    path: Path | str,
    schema: DataSchema,
    fmt: CsvFormat | None = None,
    storage: Storage = IN_MEMORY,
) -> PartnerData:
    """Load a partner's CSV or Parquet file (by its suffix) and validate it."""
    path = Path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        from clients.parquet import load_partner_parquet

        return load_partner_parquet(path, schema, storage)
    return load_partner_csv(path, schema, fmt, storage)


def count_valid_rows(path: Path | str, schema: DataSchema, fmt: CsvFormat | None = None) -> int:
    """Validate a file and count its rows, keeping none of them (memory stays bounded)."""
    return load_partner_data(path, schema, fmt, VALIDATE_ONLY).n_rows


def iter_problems(
    path: Path | str, schema: DataSchema, fmt: CsvFormat | None = None, *, per_column: int = 3
) -> Iterator[DataError]:
    """Up to ``per_column`` problems of each column of a file, for ``fedvault data check``.

    Within a block, problems come in file order. File-level and header problems
    end the listing (nothing after them can be read reliably); so does a
    structural one, listed after the problems above it.
    """
    path = Path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        from clients.parquet import iter_parquet_problems

        yield from iter_parquet_problems(path, schema, per_column=per_column)
        return
    fmt = fmt or CsvFormat()
    counts: dict[str, int] = {}
    try:
        for validator, block, error in _csv_blocks(path, schema, fmt):
            yield from validator.column_problems(block, counts, per_column)
            if error is not None:
                yield error
                return
    except DataError as exc:
        yield exc


def column_histograms(
    path: Path | str,
    columns: list[str],
    missing_values: tuple[str, ...],
    fmt: CsvFormat | None = None,
) -> npt.NDArray[np.float64]:
    """Exact counts of ``columns``' values in the bounds grid, one row per column.

    For the DP bounds query (:mod:`fedvault.bounds`; the node adds the noise).
    No bounds are known yet (that is the point of the query), so a value is
    only checked to be a finite number; a cell that is not one is a DataError
    with its line and column, as in validation. Counts accumulate per block of
    rows, so memory does not grow with the file.
    """
    from fedvault.bounds import N_BINS, histogram

    path = Path(path)
    shown = str(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        from clients.parquet import parquet_histograms

        return parquet_histograms(path, columns)
    fmt = fmt or CsvFormat()
    markers = frozenset(missing_values)
    counts = np.zeros((len(columns), N_BINS))
    positions: dict[str, int] | None = None
    width = 0
    block: list[list[float]] = [[] for _ in columns]

    def flush() -> None:
        for j, values in enumerate(block):
            counts[j] += histogram(np.array(values, dtype=np.float64))
            values.clear()

    for item in _records(path, fmt, shown):
        if isinstance(item, DataError):
            raise item
        start, row = item
        if positions is None:
            header = [name.strip() for name in row]
            absent = [c for c in columns if c not in header]
            if absent:
                raise DataError(
                    f"missing column(s) {_names(absent)}, asked for by the bounds query",
                    path=shown,
                    line=start,
                    column=absent[0],
                )
            positions = {name: header.index(name) for name in columns}
            width = len(header)
            continue
        if len(row) != width:
            raise DataError(
                f"expected {width} cells (one per header column), got {len(row)}",
                path=shown,
                line=start,
            )
        for out, name in zip(block, columns, strict=True):
            text = row[positions[name]].strip()
            if text in markers:
                continue
            try:
                number = float(text) if text.isascii() and "_" not in text else np.nan
            except ValueError:
                number = np.nan
            if not np.isfinite(number):
                raise DataError(
                    f"expected a finite number, got {_quote(text)}",
                    path=shown,
                    line=start,
                    column=name,
                )
            out.append(number)
        if len(block[0]) >= BLOCK_ROWS or any(len(b) >= BLOCK_ROWS for b in block):
            flush()
    if positions is None:
        raise DataError("file is empty, expected a header line", path=shown, line=1)
    flush()
    return counts


_REPR = r"""(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
_CELL_PATTERNS = (
    (re.compile(r"\bgot " + _REPR), "got another value"),
    (re.compile(r"\bunknown category " + _REPR), "an undeclared category"),
    (re.compile(r"\bunknown label " + _REPR), "an undeclared label"),
    (re.compile(r"\btarget " + _REPR + " outside"), "a target outside"),
    (re.compile(r"\bvalue \S+ outside"), "a value outside"),
)


def without_cells(message: str) -> str:
    """A data error's message with the offending cell's value taken out.

    What a node sends the coordinator when it refuses: the file, line, column
    and kind of problem locate it for partner IT, the value itself stays at
    the site (``fedvault data check`` shows it there).
    """
    for pattern, replacement in _CELL_PATTERNS:
        message = pattern.sub(replacement, message)
    return message
