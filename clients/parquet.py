"""Partner-side loading of a Parquet file against the federation schema (pyarrow).

Read one row group at a time, so memory holds one group's columns plus the
encoded float32 result. A problem is located by row group and row (1-based,
counted over the whole file), and the column: Parquet has no lines.

Column types accepted: numeric features from integer or floating columns (a
null is a missing value), or from text columns holding numbers; booleans from
boolean, integer (0/1) or text columns; categoricals and class labels from
text (or dictionary-encoded text) columns, or integer columns whose values are
the declared names (``0``/``1`` classes); a regression target from a numeric
column.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from clients.data import PartnerData, finish
from clients.rows import IN_MEMORY, RowSink, Storage
from fedvault.encoding import InvalidValue, encoding_for, parse_cells, parse_labels, typed_values
from fedvault.errors import DataError
from fedvault.schema import DataSchema, FeatureSpec

__all__ = ["iter_parquet_problems", "load_partner_parquet"]


def _open(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a dependency of fedvault
        raise DataError(
            "reading Parquet needs pyarrow (pip install pyarrow)", path=str(path)
        ) from None
    shown = str(path)
    if path.is_dir():
        raise DataError("is a directory, expected a Parquet file", path=shown)
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError("file not found", path=shown) from None
    except PermissionError:
        raise DataError("permission denied, cannot read the file", path=shown) from None
    except OSError as exc:
        raise DataError(f"not a readable Parquet file ({_reason(exc)})", path=shown) from None
    except Exception as exc:
        raise DataError(f"not a readable Parquet file ({_reason(exc)})", path=shown) from None


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]


def _check_columns(names: list[str], schema: DataSchema, shown: str) -> None:
    wanted = set(schema.columns) | set(schema.ignore)
    extra = [n for n in names if n not in wanted]
    if extra:
        raise DataError(
            f"unexpected column(s) {', '.join(map(repr, extra[:5]))}, not in schema "
            f"{schema.name!r} (a column the federation does not use can be declared in the "
            "schema's ignore list)",
            path=shown,
            column=extra[0],
        )
    missing = [n for n in schema.columns if n not in names]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(map(repr, missing[:5]))}, required by schema "
            f"{schema.name!r}",
            path=shown,
            column=missing[0],
        )


def _as_text(column: Any) -> list[str]:
    """A column's values as text cells; null becomes the empty (missing) cell."""
    return ["" if v is None else str(v) for v in column.to_pylist()]


def _feature(spec: FeatureSpec, column: Any, missing: frozenset[str]) -> npt.NDArray[Any]:
    import pyarrow as pa
    import pyarrow.types as pt

    kind = column.type
    if pt.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = column.type
    if spec.type == "categorical" or pt.is_string(kind) or pt.is_large_string(kind):
        if spec.type != "categorical" and not (pt.is_string(kind) or pt.is_large_string(kind)):
            raise InvalidValue(0, f"expected a text column, Parquet type is {kind}")
        return parse_cells(spec, _as_text(column), missing)
    if pt.is_boolean(kind) or pt.is_integer(kind) or pt.is_floating(kind):
        values = np.asarray(
            column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64
        )
        nan = np.isnan(values) & ~np.asarray(column.is_null().to_numpy(zero_copy_only=False))
        if nan.any():  # a stored NaN is not a null: refused as a CSV "nan" is
            raise InvalidValue(int(np.argmax(nan)), "expected a finite float, got nan")
        return typed_values(spec, values)
    raise InvalidValue(0, f"expected a numeric column, Parquet type is {kind}")


def _labels(schema: DataSchema, column: Any) -> npt.NDArray[Any]:
    import pyarrow.types as pt

    if schema.is_regression and (pt.is_integer(column.type) or pt.is_floating(column.type)):
        cells = ["" if v is None else repr(float(v)) for v in column.to_pylist()]
        return parse_labels(schema, cells)
    return parse_labels(schema, _as_text(column))


def _groups(path: Path, schema: DataSchema) -> Iterator[tuple[int, int, Any]]:
    """(row group, first row of the group, table) of each row group."""
    handle = _open(path)
    shown = str(path)
    names = list(handle.schema_arrow.names)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"duplicate column(s) {', '.join(map(repr, twice))}", path=shown)
    _check_columns(names, schema, shown)
    first = 0
    for group in range(handle.num_row_groups):
        try:
            table = handle.read_row_group(group, columns=list(schema.columns))
        except Exception as exc:
            raise DataError(
                f"row group {group}: cannot be read ({_reason(exc)})", path=shown
            ) from None
        yield group, first, table
        first += table.num_rows


def _where(group: int, first: int, row: int) -> str:
    return f"row {first + row + 1} (row group {group}, row {row + 1} in it)"


def load_partner_parquet(
    path: Path | str, schema: DataSchema, storage: Storage = IN_MEMORY
) -> PartnerData:
    """Load and fully validate a partner Parquet file; DataError at the first problem."""
    path = Path(path)
    encoding = encoding_for(schema)
    sink = storage.sink(encoding.width)
    labels: list[npt.NDArray[Any]] = []
    try:
        _load_groups(path, schema, sink, labels)
    except BaseException:
        sink.discard()
        raise
    return finish(sink, labels, path)


def _load_groups(
    path: Path, schema: DataSchema, sink: RowSink, labels: list[npt.NDArray[Any]]
) -> None:
    shown = str(path)
    encoding = encoding_for(schema)
    missing = frozenset(schema.missing_values)
    for group, first, table in _groups(path, schema):
        if table.num_rows == 0:
            continue
        found: list[tuple[int, int, DataError]] = []
        typed = []
        for position, spec in enumerate(schema.features):
            try:
                typed.append(_feature(spec, table.column(spec.name), missing))
            except InvalidValue as exc:
                where = _where(group, first, exc.row)
                found.append(
                    (
                        exc.row,
                        position,
                        DataError(f"{where}: {exc.message}", path=shown, column=spec.name),
                    )
                )
        try:
            y = _labels(schema, table.column(schema.label))
        except InvalidValue as exc:
            where = _where(group, first, exc.row)
            found.append(
                (
                    exc.row,
                    len(schema.features),
                    DataError(f"{where}: {exc.message}", path=shown, column=schema.label),
                )
            )
        if found:
            raise min(found, key=lambda item: item[:2])[2]
        sink.commit(encoding.encode(typed, sink.buffer(table.num_rows)))
        labels.append(y)
    if not labels:
        raise DataError("no data rows, expected at least one row", path=shown)


def iter_parquet_problems(
    path: Path, schema: DataSchema, *, per_column: int = 3
) -> Iterator[DataError]:
    """Each column's first problem per row group (up to ``per_column`` in all)."""
    shown = str(path)
    missing = frozenset(schema.missing_values)
    counts: dict[str, int] = {}
    try:
        for group, first, table in _groups(path, schema):
            for spec in schema.features:
                if counts.get(spec.name, 0) >= per_column:
                    continue
                try:
                    _feature(spec, table.column(spec.name), missing)
                except InvalidValue as exc:
                    counts[spec.name] = counts.get(spec.name, 0) + 1
                    yield DataError(
                        f"{_where(group, first, exc.row)}: {exc.message}",
                        path=shown,
                        column=spec.name,
                    )
            if counts.get(schema.label, 0) < per_column:
                try:
                    _labels(schema, table.column(schema.label))
                except InvalidValue as exc:
                    counts[schema.label] = counts.get(schema.label, 0) + 1
                    yield DataError(
                        f"{_where(group, first, exc.row)}: {exc.message}",
                        path=shown,
                        column=schema.label,
                    )
    except DataError as exc:
        yield exc


def parquet_histograms(path: Path, columns: list[str]) -> npt.NDArray[np.float64]:
    """Exact counts of ``columns``' values in the bounds grid, one row group at a time."""
    import pyarrow as pa
    import pyarrow.types as pt

    from fedvault.bounds import N_BINS, histogram

    handle = _open(path)
    shown = str(path)
    names = list(handle.schema_arrow.names)
    absent = [c for c in columns if c not in names]
    if absent:
        raise DataError(
            f"missing column(s) {', '.join(map(repr, absent[:5]))}, asked for by the bounds query",
            path=shown,
            column=absent[0],
        )
    counts = np.zeros((len(columns), N_BINS))
    for group in range(handle.num_row_groups):
        try:
            table = handle.read_row_group(group, columns=columns)
        except Exception as exc:
            raise DataError(
                f"row group {group}: cannot be read ({_reason(exc)})", path=shown
            ) from None
        for j, name in enumerate(columns):
            column = table.column(name)
            if not (pt.is_integer(column.type) or pt.is_floating(column.type)):
                raise DataError(
                    f"expected a numeric column, Parquet type is {column.type}",
                    path=shown,
                    column=name,
                )
            values = np.asarray(column.cast(pa.float64()).to_numpy(), dtype=np.float64)
            counts[j] += histogram(values)
    return counts
