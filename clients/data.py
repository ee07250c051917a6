"""Partner-side loading and validation of a local CSV file against the federation schema.

Runs on the partner node, so it imports only numpy and the standard library (no
sklearn, no torch) to keep process start fast.

Every problem is reported as a :class:`~fedvault.errors.DataError` carrying the file,
the 1-based physical line (the header is line 1) and the column name of the *first*
problem in file order (top to bottom, then left to right). Messages may quote the
single offending cell (truncated to 40 characters) but never other rows' values.

File format accepted:

* UTF-8 (an optional byte-order mark is ignored), RFC 4180 quoting, any line endings;
* a header naming exactly the schema's features and its label column, in any order
  (surrounding whitespace in names is ignored);
* numeric cells as Python/numpy float literals in ASCII without ``_`` separators,
  surrounding whitespace allowed; ``int`` columns accept integral values (``3``,
  ``3.0``); NaN and infinities are rejected; values must lie in the feature's
  public ``[min, max]``;
* label cells exactly one of the schema's class names (surrounding whitespace ignored);
* blank lines are skipped (they still count for line numbers).

Validation is column-wise with numpy in the common path; only a column that fails
is rescanned cell by cell to pinpoint the first bad cell.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedvault.errors import DataError
from fedvault.schema import DataSchema, FeatureSpec

__all__ = ["PartnerData", "load_partner_csv"]

_QUOTE_LIMIT = 40
_LIST_LIMIT = 5


@dataclass(frozen=True, slots=True, eq=False)
class PartnerData:
    """A validated partner table: read-only arrays in schema feature order."""

    features: npt.NDArray[np.float32]  # shape (n, d), columns in schema order
    labels: npt.NDArray[np.int64]  # shape (n,), index into schema.classes
    path: Path

    @property
    def n_rows(self) -> int:
        return int(self.features.shape[0])


def _quote(cell: str) -> str:
    """The single offending cell, quoted and truncated for an error message."""
    return repr(cell if len(cell) <= _QUOTE_LIMIT else cell[:_QUOTE_LIMIT] + "...")


def _names(names: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(_quote(n) for n in names[:_LIST_LIMIT])
    rest = len(names) - _LIST_LIMIT
    return shown + (f" and {rest} more" if rest > 0 else "")


def _fmt(value: float) -> str:
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _cell_problem(cell: str, spec: FeatureSpec) -> str | None:
    """What is wrong with one numeric cell, or None if it is valid. The single source
    of truth for cell validity; the vectorised path must agree with it."""
    kind = "an integer" if spec.dtype == "int" else "a float"
    text = cell.strip()
    if not text:
        return f"missing value, expected {kind}"
    if not text.isascii() or "_" in text:
        return f"expected {kind}, got {_quote(text)}"
    try:
        value = float(text)
    except ValueError:
        return f"expected {kind}, got {_quote(text)}"
    if not math.isfinite(value):
        finite = "an integer" if spec.dtype == "int" else "a finite float"
        return f"expected {finite}, got {_quote(text)}"
    if spec.dtype == "int" and not value.is_integer():
        return f"expected an integer, got {_quote(text)}"
    if value < spec.min or value > spec.max:
        shown = text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "..."
        return f"value {shown} outside the schema range [{_fmt(spec.min)}, {_fmt(spec.max)}]"
    return None


def _numeric_column(
    cells: tuple[str, ...], spec: FeatureSpec
) -> tuple[npt.NDArray[np.float64] | None, int | None]:
    """Parse one column: (values, None) if all valid, else (None, first bad row index)."""
    joined = "\x1f".join(cells)
    if joined.isascii() and "_" not in joined:
        try:
            values = np.array(cells, dtype=np.float64)
        except ValueError:
            pass  # some cell does not parse: pinpoint it below
        else:
            bad = ~np.isfinite(values) | (values < spec.min) | (values > spec.max)
            if spec.dtype == "int":
                with np.errstate(invalid="ignore"):
                    bad |= values != np.floor(values)
            if not bad.any():
                return values, None
            return None, int(np.argmax(bad))
    for index, cell in enumerate(cells):
        if _cell_problem(cell, spec) is not None:
            return None, index
    # Unreachable unless numpy and float() disagree; stay safe and reject.
    return None, 0  # pragma: no cover


def _read_text(path: Path) -> str:
    shown = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=shown) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected a CSV file", path=shown) from None
    except PermissionError:
        raise DataError("permission denied, cannot read the file", path=shown) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DataError(f"cannot read the file ({reason})", path=shown) from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"not valid UTF-8 text (byte {exc.start}), expected a UTF-8 CSV file",
            path=shown,
            line=line,
        ) from None


def _check_header(header: list[str], schema: DataSchema, shown: str, line: int) -> dict[str, int]:
    """Map each schema column to its position in the file, or raise DataError."""
    expected = schema.columns
    wanted = set(expected)
    if not wanted.intersection(header):
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
            f"unexpected column(s) {_names(extra)}, not in schema {schema.name!r}",
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


def load_partner_csv(path: Path | str, schema: DataSchema) -> PartnerData:
    """Load and fully validate a partner CSV; raise DataError at the first problem."""
    path = Path(path)
    shown = str(path)
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)

    header: list[str] | None = None
    header_line = 1
    width = 0
    rows: list[list[str]] = []
    lines: list[int] = []
    structural: DataError | None = None  # first row-level problem; cell problems above it win
    previous_end = 0
    records = iter(reader)
    while True:
        start = previous_end + 1
        try:
            row = next(records)
        except StopIteration:
            break
        except csv.Error as exc:
            structural = DataError(
                f"malformed CSV in the record starting here ({exc})", path=shown, line=start
            )
            break
        previous_end = reader.line_num
        if len(row) <= 1 and not "".join(row).strip():
            continue  # blank line
        if header is None:
            header = [name.strip() for name in row]
            header_line = start
            width = len(header)
            continue
        if len(row) != width:
            structural = DataError(
                f"expected {width} cells (one per header column), got {len(row)}",
                path=shown,
                line=start,
            )
            break
        rows.append(row)
        lines.append(start)
    if header is None:
        if structural is not None:
            raise structural
        raise DataError("file is empty, expected a header line", path=shown, line=1)
    return _validate(header, header_line, rows, lines, structural, schema, shown, path)


def _validate(
    header: list[str],
    header_line: int,
    rows: list[list[str]],
    lines: list[int],
    structural: DataError | None,
    schema: DataSchema,
    shown: str,
    path: Path,
) -> PartnerData:
    positions = _check_header(header, schema, shown, header_line)
    if not rows:
        if structural is not None:
            raise structural
        raise DataError(
            "no data rows, expected at least one row after the header",
            path=shown,
            line=header_line + 1,
        )
    columns = list(zip(*rows, strict=True))
    n = len(rows)
    features = np.empty((n, len(schema.features)), dtype=np.float32)
    best: tuple[int, int, str] | None = None  # (row index, file position, message)

    def consider(row: int, pos: int, message: str) -> None:
        nonlocal best
        if best is None or (row, pos) < best[:2]:
            best = (row, pos, message)

    for j, spec in enumerate(schema.features):
        pos = positions[spec.name]
        values, bad = _numeric_column(columns[pos], spec)
        if bad is not None:
            message = _cell_problem(columns[pos][bad], spec) or "invalid value"
            consider(bad, pos, message)
        elif values is not None:
            features[:, j] = values

    label_pos = positions[schema.label]
    index = {name: i for i, name in enumerate(schema.classes)}
    label_cells = columns[label_pos]
    labels = np.fromiter(
        (index.get(cell.strip(), -1) for cell in label_cells), dtype=np.int64, count=n
    )
    if (labels < 0).any():
        bad = int(np.argmax(labels < 0))
        cell = label_cells[bad].strip()
        expected = f"expected one of {_names(schema.classes)}"
        if cell:
            consider(bad, label_pos, f"unknown label {_quote(cell)}, {expected}")
        else:
            consider(bad, label_pos, f"missing label, {expected}")

    if best is not None:
        row, pos, message = best
        raise DataError(message, path=shown, line=lines[row], column=header[pos])
    if structural is not None:
        raise structural
    features.flags.writeable = False
    labels.flags.writeable = False
    return PartnerData(features=features, labels=labels, path=path)
