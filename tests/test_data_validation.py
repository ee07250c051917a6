"""clients.data.load_partner_csv: loading, and the location of every kind of error."""

from __future__ import annotations

import csv
import io
import string
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.arrow_csv import load_with_arrow
from clients.data import CsvFormat, PartnerData, load_exact, load_partner_csv
from fedvault.errors import DataError
from fedvault.schema import DEFAULT_MISSING_VALUES, DataSchema, FeatureSpec, builtin_schema

SCHEMA = DataSchema(
    name="toy",
    features=(
        FeatureSpec(name="a", type="float", min=0, max=1),
        FeatureSpec(name="b", type="int", min=0, max=16),
    ),
    label="y",
    classes=("cat", "dog"),
)


def _write(tmp_path: Path, text: str | bytes, name: str = "data.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_bytes(text.encode("utf-8"))
    return path


def _error(path: Path, schema: DataSchema = SCHEMA) -> DataError:
    with pytest.raises(DataError) as info:
        load_partner_csv(path, schema)
    err = info.value
    assert err.path == str(path)
    return err


# --------------------------------------------------------------------------- happy path


def test_loads_valid_file_in_schema_order(tmp_path: Path) -> None:
    path = _write(tmp_path, "y,b,a\ncat,3,0.5\ndog, 16 ,1\n cat ,0.0,0\n")
    data = load_partner_csv(path, SCHEMA)
    assert isinstance(data, PartnerData)
    assert data.path == path
    assert data.n_rows == 3
    assert data.features.dtype == np.float32
    assert data.features.shape == (3, 2)
    np.testing.assert_array_equal(data.features, [[0.5, 3], [1, 16], [0, 0]])
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, [0, 1, 0])
    assert not data.features.flags.writeable
    assert not data.labels.flags.writeable


def test_accepts_bom_crlf_blank_lines_and_str_path(tmp_path: Path) -> None:
    path = _write(tmp_path, b"\xef\xbb\xbfa,b,y\r\n0.25,1,dog\r\n\r\n1e-1,2,cat\r\n\r\n")
    data = load_partner_csv(str(path), SCHEMA)
    np.testing.assert_allclose(data.features, [[0.25, 1], [0.1, 2]])
    np.testing.assert_array_equal(data.labels, [1, 0])


def test_digit_labels_are_class_names(tmp_path: Path) -> None:
    schema = builtin_schema("digits")
    header = ",".join(schema.columns)
    row = ",".join(["16"] * 64 + ["7"])
    data = load_partner_csv(_write(tmp_path, f"{header}\n{row}\n"), schema)
    assert data.labels.tolist() == [7]


# --------------------------------------------------------------------------- file level


def test_missing_file(tmp_path: Path) -> None:
    err = _error(tmp_path / "nope.csv")
    assert "file not found" in str(err)
    assert err.line is None


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    err = _error(tmp_path)
    assert "directory" in str(err)


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    err = _error(_write(tmp_path, text))
    assert err.line == 1
    assert "empty" in str(err)


def test_invalid_utf8_reports_line(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, b"a,b,y\n0.5,1,cat\n0.5,1,c\xffat\n"))
    assert err.line == 3
    assert "UTF-8" in str(err)


def test_malformed_quoting(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, 'a,b,y\n0.5,1,cat\n0.5,"1"x,cat\n'))
    assert err.line == 3
    assert "malformed CSV" in str(err)
    err = _error(_write(tmp_path, 'a,b,y\n0.5,1,cat\n0.5,1,"cat\n0.1,2,dog\n'))
    assert err.line == 3
    assert "malformed CSV" in str(err)


# --------------------------------------------------------------------------- header


def test_missing_columns_are_named(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "y,a\ncat,0.5\n"))
    assert (err.line, err.column) == (1, "b")
    assert "missing column(s) 'b'" in str(err)


def test_extra_columns_are_named(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "a,zz,b,y,extra\n0.5,1,1,cat,2\n"))
    assert (err.line, err.column) == (1, "zz")
    assert "'zz', 'extra'" in str(err)


def test_duplicate_columns(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "a,b,a,y\n0.5,1,0.5,cat\n"))
    assert (err.line, err.column) == (1, "a")
    assert "duplicate column 'a'" in str(err)


def test_headerless_file_does_not_echo_data(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "0.123456,7,cat\n0.5,1,dog\n"))
    assert err.line == 1
    assert "header" in str(err)
    assert "0.123456" not in str(err)


def test_header_only(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "a,b,y\n"))
    assert err.line == 2
    assert "no data rows" in str(err)


def test_header_after_blank_lines_keeps_physical_lines(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "\n\na,b,y\n0.5,1,cat\n\n0.5,x,cat\n"))
    assert (err.line, err.column) == (6, "b")


# --------------------------------------------------------------------------- cells


@pytest.mark.parametrize(
    ("row", "column", "message"),
    [
        ("0.5,1", None, "expected 3 cells"),
        ("0.5,1,cat,4", None, "expected 3 cells"),
        (",1,cat", "a", "missing value, expected a float"),
        ("  ,1,cat", "a", "missing value, expected a float"),
        ("0.5,,cat", "b", "missing value, expected an integer"),
        ("abc,1,cat", "a", "expected a float, got 'abc'"),
        ("0.5,abc,cat", "b", "expected an integer, got 'abc'"),
        ("1_0,1,cat", "a", "expected a float, got '1_0'"),
        ("\u0661,1,cat", "a", "expected a float"),
        ("0.5,1.5,cat", "b", "expected an integer, got '1.5'"),
        ("nan,1,cat", "a", "expected a finite float, got 'nan'"),
        ("inf,1,cat", "a", "expected a finite float, got 'inf'"),
        ("-Infinity,1,cat", "a", "expected a finite float, got '-Infinity'"),
        ("1e400,1,cat", "a", "expected a finite float, got '1e400'"),
        ("0.5,nan,cat", "b", "expected an integer, got 'nan'"),
        ("0.5,99,cat", "b", "value 99 outside the schema range [0, 16]"),
        ("0.5,-1,cat", "b", "value -1 outside the schema range [0, 16]"),
        ("1.0001,1,cat", "a", "value 1.0001 outside the schema range [0, 1]"),
        ("0.5,1,cow", "y", "unknown label 'cow', expected one of 'cat', 'dog'"),
        ("0.5,1,Cat", "y", "unknown label 'Cat'"),
        ("0.5,1,", "y", "missing label, expected one of 'cat', 'dog'"),
    ],
)
def test_cell_errors_report_line_and_column(
    tmp_path: Path, row: str, column: str | None, message: str
) -> None:
    text = f"a,b,y\n0.25,2,dog\n0.75,3,cat\n{row}\n0.5,4,dog\n"
    err = _error(_write(tmp_path, text))
    assert err.line == 4
    assert err.column == column
    assert message in str(err)
    # Privacy: no other row's values appear in the message.
    assert "0.25" not in str(err)
    assert "0.75" not in str(err)


def test_long_cell_is_truncated(tmp_path: Path) -> None:
    long = "x" * 200
    err = _error(_write(tmp_path, f"a,b,y\n{long},1,cat\n"))
    assert "x" * 40 + "..." in str(err)
    assert "x" * 41 not in str(err)


def test_first_problem_in_file_order(tmp_path: Path) -> None:
    # Row 3 has two bad cells: the leftmost in the *file* wins (b is left of a here).
    err = _error(_write(tmp_path, "y,b,a\ncat,1,0.5\ncow,99,abc\n"))
    assert (err.line, err.column) == (3, "y")
    err = _error(_write(tmp_path, "b,a,y\n1,0.5,cat\n99,abc,cat\n"))
    assert (err.line, err.column) == (3, "b")
    # An earlier row in a later column beats a later row in an earlier column.
    err = _error(_write(tmp_path, "a,b,y\n0.5,1,cow\nabc,1,cat\n"))
    assert (err.line, err.column) == (2, "y")
    # A cell problem above a structural problem wins, and vice versa.
    err = _error(_write(tmp_path, "a,b,y\n0.5,x,cat\n0.5,1\n"))
    assert (err.line, err.column) == (2, "b")
    err = _error(_write(tmp_path, "a,b,y\n0.5,1\n0.5,x,cat\n"))
    assert (err.line, err.column) == (2, None)
    err = _error(_write(tmp_path, 'a,b,y\n0.5,x,cat\n0.5,1,"cat\n'))
    assert (err.line, err.column) == (2, "b")


def test_multiline_quoted_cell_keeps_physical_lines(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, 'a,b,y\n0.5,1,"ca\nt"\n0.5,1,cat\n'))
    assert (err.line, err.column) == (2, "y")
    # A (valid, whitespace-padded) cell spanning lines 3-5 shifts the next record to 6.
    err = _error(_write(tmp_path, 'a,b,y\n0.5,1,"cat"\n0.5,"1\n\n",cat\n0.5,x,cat\n'))
    assert (err.line, err.column) == (6, "b")


def test_errors_are_never_raw_exceptions(tmp_path: Path) -> None:
    for blob in (b"\x00\x01\x02", b"a,b,y\n\x00,1,cat\n", bytes(range(256))):
        with pytest.raises(DataError):
            load_partner_csv(_write(tmp_path, blob), SCHEMA)


def test_a_valid_file_takes_the_fast_path_and_both_paths_agree(tmp_path: Path) -> None:
    from fedvault.datasets import split_dataset

    for name in ("digits", "flchain", "diamonds", "penguins"):
        split_dataset(name, tmp_path / name, partners=2, seed=3)
        schema = builtin_schema(name)
        path = tmp_path / name / "partner-0" / "train.csv"
        fast = load_with_arrow(path, schema, "utf-8", None)
        assert fast is not None, name
        exact = load_exact(path, schema, CsvFormat())
        np.testing.assert_array_equal(fast[0].finish().array(), exact.features)
        np.testing.assert_array_equal(np.concatenate(fast[1]), exact.labels)
    # A file the fast path doubts goes to the exact path, which names the problem.
    bad = _write(tmp_path, "a,b,y\n0.5,1,cat\n0.5,nan,cat\n")
    assert load_with_arrow(bad, SCHEMA, "utf-8", None) is None
    assert (_error(bad).line, _error(bad).column) == (3, "b")


def test_validates_10k_by_64_quickly(tmp_path: Path) -> None:
    schema = builtin_schema("digits")
    rng = np.random.default_rng(0)
    features = rng.integers(0, 17, size=(10_000, 64))
    labels = rng.integers(0, 10, size=10_000)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(schema.columns)
    writer.writerows([*map(str, row), str(lab)] for row, lab in zip(features, labels, strict=True))
    path = _write(tmp_path, buffer.getvalue())
    start = time.perf_counter()
    data = load_partner_csv(path, schema)
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(data.features, features)
    np.testing.assert_array_equal(data.labels, labels)
    assert elapsed < 1.0, f"validation took {elapsed:.3f}s"
    # A bad cell in the very last row is still pinpointed.
    lines = buffer.getvalue().splitlines()
    cells = lines[-1].split(",")
    cells[63] = "17"
    lines[-1] = ",".join(cells)
    err = _error(_write(tmp_path, "\n".join(lines) + "\n", "bad.csv"), schema)
    assert (err.line, err.column) == (10_001, "px_63")
    assert "value 17 outside the schema range [0, 16]" in str(err)


# --------------------------------------------------------------------------- property

Row = tuple[list[float | int], int]


@st.composite
def _tables(draw: st.DrawFn) -> tuple[DataSchema, list[str], list[Row]]:
    specs = []
    for j in range(draw(st.integers(1, 5))):
        low = draw(st.integers(-1000, 1000))
        high = low + draw(st.integers(1, 1000))
        dtype = draw(st.sampled_from(["float", "int"]))
        specs.append(FeatureSpec(name=f"f{j}", type=dtype, min=low, max=high))
    classes = draw(
        st.lists(
            st.text(string.ascii_letters + string.digits, min_size=1, max_size=5).filter(
                lambda c: c not in DEFAULT_MISSING_VALUES
            ),
            min_size=2,
            max_size=4,
            unique=True,
        )
    )
    schema = DataSchema(name="t", features=tuple(specs), label="label", classes=tuple(classes))
    rows: list[Row] = []
    for _ in range(draw(st.integers(1, 25))):
        values: list[float | int] = [
            draw(st.integers(int(s.min), int(s.max)))
            if s.type == "int"
            else draw(st.floats(s.min, s.max, allow_nan=False))
            for s in specs
        ]
        rows.append((values, draw(st.integers(0, len(classes) - 1))))
    order = draw(st.permutations(list(schema.columns)))
    return schema, order, rows


def _render(schema: DataSchema, order: list[str], rows: list[Row]) -> list[list[str]]:
    position = {name: i for i, name in enumerate(schema.columns)}
    out = [list(order)]
    for values, label in rows:
        cells = [repr(v) if isinstance(v, float) else str(v) for v in values]
        cells.append(schema.classes[label])
        out.append([cells[position[name]] for name in order])
    return out


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


_GARBAGE = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from('\n\r\t,"'),
    max_size=50,
).filter(_not_a_number)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=_tables(), data=st.data())
def test_property_round_trip_and_corruption(
    table: tuple[DataSchema, list[str], list[Row]], data: st.DataObject
) -> None:
    schema, order, rows = table
    grid = _render(schema, order, rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(grid)
        loaded = load_partner_csv(path, schema)
        expected = np.array([v for v, _ in rows], dtype=np.float64).astype(np.float32)
        np.testing.assert_array_equal(loaded.features, expected)
        assert loaded.labels.tolist() == [label for _, label in rows]
        # The fast (pyarrow) path, where it accepts the file, agrees with the exact one.
        exact = load_exact(path, schema, CsvFormat())
        np.testing.assert_array_equal(exact.features, expected)
        fast = load_with_arrow(path, schema, "utf-8", None)
        if fast is not None:
            np.testing.assert_array_equal(fast[0].finish().array(), expected)
            assert np.concatenate(fast[1]).tolist() == exact.labels.tolist()

        r = data.draw(st.integers(0, len(rows) - 1), label="row")
        name = data.draw(st.sampled_from(list(schema.feature_names)), label="column")
        garbage = data.draw(_GARBAGE, label="garbage")
        grid[r + 1][order.index(name)] = garbage
        with path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(grid)
        with pytest.raises(DataError) as info:
            load_partner_csv(path, schema)
        assert (info.value.line, info.value.column) == (r + 2, name)
