"""Fuzzing of the inputs partners and operators hand fedvault: data files, schema
files and training configs. Whatever the bytes, the answer is a value or one of
fedvault's typed errors (a precise CLI message), never a crash, and nothing is
left behind.

Bounded in CI (``FEDVAULT_FUZZ_EXAMPLES``, default 150 per property); the
same properties run longer with ``python bench/fuzz.py``.
"""

from __future__ import annotations

import contextlib
import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.data import CsvFormat, iter_problems, load_partner_data
from clients.rows import Storage
from fedvault.errors import ConfigError, DataError
from fedvault.schema import load_schema
from fedvault.training_config import load_training_config

EXAMPLES = int(os.environ.get("FEDVAULT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

SCHEMA = """
name = "fuzz"
task = "binary"
label = "y"
classes = ["no", "yes"]
ignore = ["id"]

[[features]]
name = "age"
type = "int"
min = 0
max = 120

[[features]]
name = "ward"
type = "categorical"
categories = ["A", "B"]
other = "B"
missing = "mean"

[[features]]
name = "crp"
type = "float"
min = 0
max = 500
log1p = true
missing = "mean"

[[features]]
name = "smoker"
type = "boolean"
missing = "constant"
fill = false
"""

_CELLS = st.one_of(
    st.sampled_from(["", "NA", "0", "1", "-1", "12", "120", "121", "1e3", "nan", "inf", "A", "B"]),
    st.sampled_from(["C", "yes", "no", "true", "false", " 7 ", "1_0", "0x10", "１２", "\x00"]),
    st.text(alphabet=string.printable + "é€\u2028\ufeff", max_size=8),
)
_JOINERS = st.sampled_from([",", ";", "\t", "|", '"', "\r\n", "\n", "\r", ""])


@st.composite
def _csv_bytes(draw: st.DrawFn) -> bytes:
    """Mostly CSV-shaped bytes: a header (often right), rows of odd cells and joins."""
    columns = ["y", "age", "ward", "crp", "smoker", "id"]
    header = draw(st.permutations(columns)) if draw(st.booleans()) else draw(st.lists(_CELLS))
    lines = [",".join(header)]
    for _ in range(draw(st.integers(0, 6))):
        cells = draw(st.lists(_CELLS, min_size=0, max_size=8))
        lines.append(draw(_JOINERS).join(cells) if draw(st.booleans()) else ",".join(cells))
    text = draw(_JOINERS).join(lines) if draw(st.booleans()) else "\n".join(lines) + "\n"
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    raw = text.encode(encoding, errors="replace")
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.binary(max_size=6)) + raw[cut:]
    return raw


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> object:
    path = tmp_path_factory.mktemp("fuzz-schema") / "schema.toml"
    path.write_text(SCHEMA, encoding="utf-8")
    return load_schema(path)


@FUZZ
@given(raw=_csv_bytes(), delimiter=st.sampled_from([None, ",", ";"]))
def test_any_csv_bytes_load_or_give_a_data_error(
    schema: object, tmp_path: Path, raw: bytes, delimiter: str | None
) -> None:
    path = tmp_path / "site.csv"
    path.write_bytes(raw)
    spill = tmp_path / "spill"
    spill.mkdir(exist_ok=True)
    fmt = CsvFormat(delimiter=delimiter)
    storage = Storage(memory_bytes=64, spill_dir=spill)
    refused: DataError | None = None
    try:
        data = load_partner_data(path, schema, fmt, storage)  # type: ignore[arg-type]
    except DataError as exc:
        refused = exc
    if refused is not None:
        assert refused.path == str(path)
        problems = list(iter_problems(path, schema, fmt))  # type: ignore[arg-type]
        assert problems, "a refused file lists at least one problem"
        assert all(isinstance(p, DataError) for p in problems)
    else:
        assert data.n_rows >= 1
        assert data.features.shape == (data.n_rows, 7)
        assert list(iter_problems(path, schema, fmt)) == []  # type: ignore[arg-type]
    assert list(spill.iterdir()) == []


_TOML_VALUES = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_KEYS = st.sampled_from(
    [
        "dataset", "schema", "model", "rounds", "local_steps", "batch_size", "learning_rate",
        "momentum", "max_grad_norm", "target_epsilon", "delta", "min_partners", "loss",
        "huber_delta", "round_timeout_s", "secure_mode", "aggregation", "hidden", "x",
    ]
)  # fmt: skip


def _toml(value: object) -> str:
    """A TOML rendering good enough for fuzzing (tomllib decides what is valid)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(
            value, "nan" if value != value else repr(value)
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"


@FUZZ
@given(
    table=st.dictionaries(_KEYS, _TOML_VALUES, max_size=6),
    prefix=st.sampled_from(["[training]\n", "", "[other]\n", "training = 3\n"]),
    garbage=st.one_of(st.just(""), st.text(max_size=10)),
)
def test_any_training_config_loads_or_gives_a_config_error(
    tmp_path: Path, table: dict[str, object], prefix: str, garbage: str
) -> None:
    path = tmp_path / "training.toml"
    body = prefix + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items()) + garbage
    path.write_text(body, encoding="utf-8", errors="surrogatepass")
    # A value, or a typed error (DataError: a schema file the config names,
    # refused with its own message); anything else fails the test.
    with contextlib.suppress(ConfigError, DataError):
        load_training_config(path)


@FUZZ
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.sampled_from(SCHEMA.split("\n\n")).map(lambda block: SCHEMA.replace(block, "")),
        st.tuples(st.integers(0, len(SCHEMA)), st.text(max_size=6)).map(
            lambda cut: SCHEMA[: cut[0]] + cut[1] + SCHEMA[cut[0] :]
        ),
    )
)
def test_any_schema_file_loads_or_gives_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "schema.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with contextlib.suppress(ConfigError):
        load_schema(path)
