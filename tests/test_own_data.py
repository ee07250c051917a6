"""Partners' own tables: schema files, encoding, CSV/Parquet loading, metrics, regression."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from clients.data import CsvFormat, iter_problems, load_partner_csv, load_partner_data
from clients.fused_dp import FusedPlan, train_fused
from fedvault.datasets import load_table, split_dataset
from fedvault.encoding import InvalidValue, encoding_for, parse_cells, typed_values
from fedvault.errors import ConfigError, DataError
from fedvault.metrics import combine, partner_sums, summarise, sums_length
from fedvault.modelspec import ModelSpec, init_parameters
from fedvault.schema import (
    BUILTIN_DATASETS,
    DataSchema,
    builtin_schema,
    json_schema,
    load_schema,
    parse_schema,
    schema_hash,
    to_toml,
)
from fedvault.stats import noisy_sums, scaler_from_sums
from fedvault.training_config import load_training_config, training_schema

ROOT = Path(__file__).resolve().parents[1]

CLINIC = """
name = "clinic"
task = "binary"
label = "outcome"
classes = ["no", "yes"]
ignore = ["patient_id"]

[[features]]
name = "age"
type = "int"
min = 0
max = 120

[[features]]
name = "ward"
type = "categorical"
categories = ["A", "B", "other"]
other = "other"

[[features]]
name = "smoker"
type = "boolean"
missing = "constant"
fill = false

[[features]]
name = "crp"
type = "float"
min = 0
max = 500
log1p = true
missing = "mean"
"""


def _clinic(tmp_path: Path, text: str = CLINIC) -> DataSchema:
    path = tmp_path / "schema.toml"
    path.write_text(text, encoding="utf-8")
    return load_schema(path)


def _write(tmp_path: Path, text: str | bytes, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# --------------------------------------------------------------------------- schema files


def test_builtin_tables_are_shipped_schema_files() -> None:
    for name in BUILTIN_DATASETS:
        schema = builtin_schema(name)
        assert schema.name == name
        assert (ROOT / "fedvault" / "schemas" / f"{name}.toml").is_file()
        # Round trip through the writer used by `schema draft`.
        assert parse_schema(__import__("tomllib").loads(to_toml(schema)), source="x") == schema
    assert builtin_schema("diamonds").task == "regression"
    assert builtin_schema("flchain").ignore == ("futime", "chapter")


def test_published_json_schema_is_current() -> None:
    published = json.loads((ROOT / "docs" / "schema.schema.json").read_text(encoding="utf-8"))
    assert published == json_schema(), "regenerate with `fedvault schema json-schema`"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("max = 120", "max = -1"), "min (0.0) must be less than max"),
        (('type = "int"\nmin = 0\nmax = 120', 'type = "int"'), "needs public bounds"),
        (('other = "other"', 'other = "C"'), "must be one of the declared categories"),
        (("fill = false", "fill = 3"), "fill of a boolean feature"),
        (('classes = ["no", "yes"]', 'classes = ["no", "yes", "maybe"]'), "exactly 2 classes"),
        (('ignore = ["patient_id"]', 'ignore = ["age"]'), "are also used"),
        (("log1p = true", 'log1p = "yes"'), "log1p"),
        (('task = "binary"', 'task = "regression"'), "has no classes"),
        (('missing = "mean"', 'missing = "median"'), "missing"),
    ],
)
def test_schema_mistakes_are_named(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    text = CLINIC.replace(*change)
    assert text != CLINIC
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        _clinic(tmp_path, text)
    assert str(tmp_path / "schema.toml") in str(info.value)


def test_regression_needs_a_target_range(tmp_path: Path) -> None:
    text = CLINIC.replace('task = "binary"', 'task = "regression"').replace(
        'classes = ["no", "yes"]\n', ""
    )
    with pytest.raises(ConfigError, match=r"target = \{min, max\}"):
        _clinic(tmp_path, text)
    schema = _clinic(tmp_path, text + "\n[target]\nmin = 0\nmax = 10\n")
    assert schema.is_regression
    assert schema.n_outputs == 1


def test_schema_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_schema(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        _clinic(tmp_path, "name = ")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_schema(tmp_path / "bin.toml")


def test_a_draft_is_refused_until_filled(tmp_path: Path) -> None:
    text = CLINIC.replace("min = 0\nmax = 500\n", 'bounds = "placeholder"\n')
    with pytest.raises(ConfigError, match=r"is a draft.*'crp'"):
        _clinic(tmp_path, text)
    path = tmp_path / "schema.toml"
    draft = load_schema(path, allow_draft=True)
    assert draft.placeholders == ("crp",)


def test_schema_hash_changes_with_policy(tmp_path: Path) -> None:
    a = _clinic(tmp_path)
    b = _clinic(tmp_path, CLINIC.replace('missing = "mean"', 'missing = "refuse"'))
    assert schema_hash(a) != schema_hash(b)


def test_training_config_reads_a_schema_file_relative_to_itself(tmp_path: Path) -> None:
    _clinic(tmp_path)
    config = tmp_path / "training.toml"
    config.write_text('[training]\nschema = "schema.toml"\nrounds = 2\n', encoding="utf-8")
    cfg = load_training_config(config)
    assert cfg.dataset == "clinic"
    assert cfg.schema_file == str((tmp_path / "schema.toml").resolve())
    assert training_schema(cfg).name == "clinic"
    config.write_text('[training]\ndataset = "clinic"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="not a built-in table"):
        load_training_config(config)


# --------------------------------------------------------------------------- encoding


def test_encoding_layout_and_values(tmp_path: Path) -> None:
    schema = _clinic(tmp_path)
    enc = encoding_for(schema)
    assert enc.names == ("age", "ward=A", "ward=B", "ward=other", "smoker", "crp", "crp__missing")
    assert enc.hi[5] == pytest.approx(math.log1p(500))
    missing = frozenset(schema.missing_values)
    typed = [
        parse_cells(schema.features[0], ["40", "81"], missing),
        parse_cells(schema.features[1], ["B", "Z"], missing),  # Z -> other
        parse_cells(schema.features[2], ["yes", "NA"], missing),  # NA -> fill false
        parse_cells(schema.features[3], ["9", ""], missing),  # "" -> mean (NaN + indicator)
    ]
    x = enc.encode(typed)
    np.testing.assert_allclose(x[0], [40, 0, 1, 0, 1, math.log1p(9), 0], rtol=1e-6)
    assert x[1, :5].tolist() == [81, 0, 0, 1, 0]
    assert math.isnan(x[1, 5])
    assert x[1, 6] == 1


def test_typed_values_enforce_the_policies(tmp_path: Path) -> None:
    schema = _clinic(tmp_path)
    age, ward, _, crp = schema.features
    with pytest.raises(InvalidValue, match="missing value") as info:
        typed_values(age, np.array([30.0, np.nan]))
    assert info.value.row == 1
    with pytest.raises(InvalidValue, match="outside the schema range"):
        typed_values(crp, np.array([501.0]))
    assert typed_values(ward, np.array(["A", "nope"], dtype=object)).tolist() == [0, 2]
    strict = schema.features[1].model_copy(update={"other": None})
    with pytest.raises(InvalidValue, match="unknown category 'nope'"):
        typed_values(strict, np.array([b"A", b"nope"], dtype=object))


# --------------------------------------------------------------------------- loading


def test_csv_with_categories_gaps_and_ignored_columns(tmp_path: Path) -> None:
    schema = _clinic(tmp_path)
    path = _write(
        tmp_path,
        "patient_id,outcome,age,ward,smoker,crp\n"
        "p1,yes,40,A,true,3.5\n"
        "p2,no,71,Q,,NA\n"
        "p3,no,55,B,0,12\n",
    )
    data = load_partner_csv(path, schema)
    assert data.labels.tolist() == [1, 0, 0]
    assert data.features[1, 3] == 1  # Q -> other
    assert data.features[1, 4] == 0  # empty smoker -> fill false
    assert math.isnan(data.features[1, 5])
    assert data.features[1, 6] == 1


@pytest.mark.parametrize(
    ("row", "column", "message"),
    [
        ("p9,yes,,A,1,1", "age", "missing value, expected an integer"),
        ("p9,yes,40,A,maybe,1", "smoker", "expected true or false"),
        ("p9,yes,40,A,1,-2", "crp", "outside the schema range [0, 500]"),
        ("p9,perhaps,40,A,1,1", "outcome", "unknown label 'perhaps'"),
    ],
)
def test_csv_problems_name_line_and_column(
    tmp_path: Path, row: str, column: str, message: str
) -> None:
    schema = _clinic(tmp_path)
    path = _write(tmp_path, f"patient_id,outcome,age,ward,smoker,crp\np1,no,40,A,1,1\n{row}\n")
    with pytest.raises(DataError, match=re.escape(message)) as info:
        load_partner_csv(path, schema)
    assert (info.value.line, info.value.column) == (3, column)


def test_delimiter_is_detected_or_declared_and_encoding_declared(tmp_path: Path) -> None:
    schema = _clinic(tmp_path)
    text = "outcome;age;ward;smoker;crp\nyes;40;B;1;2,5\n".replace("2,5", "2.5")
    data = load_partner_csv(_write(tmp_path, text), schema)
    assert data.features[0, 0] == 40
    latin = "outcome|age|ward|smoker|crp\nyes|40|\xc9|1|2\n".encode("latin-1")
    path = _write(tmp_path, latin, "latin.csv")
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_partner_csv(path, schema)
    data = load_partner_csv(path, schema, CsvFormat(delimiter="|", encoding="latin-1"))
    assert data.features[0, 3] == 1  # É is not declared: mapped to other
    with pytest.raises(ConfigError, match="unknown text encoding"):
        CsvFormat(encoding="klingon")


def test_parquet_matches_csv_and_locates_problems(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    schema = _clinic(tmp_path)
    table = pa.table(
        {
            "outcome": ["yes", "no", "no"],
            "age": pa.array([40, 71, 55], pa.int64()),
            "ward": pa.array(["A", "Q", "B"]).dictionary_encode(),
            "smoker": pa.array([True, None, False]),
            "crp": pa.array([3.5, None, 12.0]),
        }
    )
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=2)
    csv_path = _write(
        tmp_path, "outcome,age,ward,smoker,crp\nyes,40,A,1,3.5\nno,71,Q,,\nno,55,B,0,12\n"
    )
    from_parquet = load_partner_data(path, schema)
    from_csv = load_partner_data(csv_path, schema)
    np.testing.assert_array_equal(from_parquet.features, from_csv.features)
    np.testing.assert_array_equal(from_parquet.labels, from_csv.labels)

    bad = table.set_column(1, "age", pa.array([40, 71, 300], pa.int64()))
    pq.write_table(bad, path, row_group_size=2)
    with pytest.raises(DataError, match=r"row 3 \(row group 1, row 1 in it\)") as info:
        load_partner_data(path, schema)
    assert info.value.column == "age"
    wrong = table.set_column(1, "age", pa.array([b"x", b"y", b"z"], pa.binary()))
    pq.write_table(wrong, path)
    with pytest.raises(DataError, match="expected a numeric column"):
        load_partner_data(path, schema)
    _write(tmp_path, b"PAR1 not really", "junk.parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_partner_data(tmp_path / "junk.parquet", schema)


def test_data_check_lists_problems_per_column(tmp_path: Path) -> None:
    schema = _clinic(tmp_path)
    rows = ["outcome,age,ward,smoker,crp"]
    rows += [f"yes,{200 + i},A,1,1" for i in range(5)]  # 5 bad ages
    rows += ["maybe,40,A,x,1"]  # a bad label and a bad smoker
    problems = list(iter_problems(_write(tmp_path, "\n".join(rows) + "\n"), schema, per_column=3))
    by_column: dict[str | None, list[int | None]] = {}
    for p in problems:
        by_column.setdefault(p.column, []).append(p.line)
    assert by_column == {"age": [2, 3, 4], "smoker": [7], "outcome": [7]}


# --------------------------------------------------------------------------- statistics


def test_mean_imputation_uses_the_observed_rows_only(tmp_path: Path) -> None:
    schema = _clinic(tmp_path)
    enc = encoding_for(schema)
    rng = np.random.default_rng(0)
    n = 4000
    crp = rng.uniform(1, 100, n)
    crp[: n // 4] = np.nan  # a quarter missing
    typed = [
        rng.integers(20, 90, n).astype(np.float64),
        rng.integers(0, 3, n),
        rng.integers(0, 2, n).astype(np.float64),
        crp,
    ]
    x = enc.encode(typed)
    total = noisy_sums(x, enc, 1e-9, rng)
    scaler = scaler_from_sums(total, enc)
    observed = np.log1p(crp[~np.isnan(crp)])
    assert scaler.mean[5] == pytest.approx(observed.mean(), rel=1e-6)
    assert scaler.mean[6] == pytest.approx(0.25, abs=1e-6)  # the indicator's share
    z = scaler.apply(x)
    assert not np.isnan(z).any()
    assert np.all(z[: n // 4, 5] == 0)  # imputed with the (DP) mean


# --------------------------------------------------------------------------- metrics


def test_federated_metrics_equal_pooled_ones() -> None:
    from sklearn.metrics import balanced_accuracy_score, r2_score, roc_auc_score

    rng = np.random.default_rng(1)
    spec = ModelSpec(kind="logreg", n_features=3, n_classes=2)
    params = init_parameters(spec, 0)
    params[0][1] += np.array([2.0, -1.0, 0.5], np.float32)
    x = rng.normal(size=(900, 3)).astype(np.float32)
    y = (x @ np.array([2.0, -1.0, 0.5]) + rng.normal(size=900) > 0).astype(np.int64)
    parts = [partner_sums(spec, params, x[i::3], y[i::3]) for i in range(3)]
    assert all(len(p) == sums_length(spec) for p in parts)
    metrics = summarise(spec, combine(parts))
    logits = x @ params[0].T + params[1]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=0.01)
    assert metrics["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(y, probs.argmax(axis=1))
    )

    reg = ModelSpec(kind="logreg", n_features=3, n_classes=1, task="regression", loss="squared")
    w = [np.array([[0.3, -0.2, 0.1]], np.float32), np.array([0.05], np.float32)]
    target = np.clip(x @ np.array([0.3, -0.2, 0.1]) + 0.05 + rng.normal(0, 0.05, 900), -1, 1)
    parts = [
        partner_sums(reg, w, x[i::3], target[i::3], target_scale=(100.0, 50.0)) for i in range(3)
    ]
    metrics = summarise(reg, combine(parts))
    pred = np.clip(x @ w[0][0] + w[1][0], -1, 1)
    assert metrics["r2"] == pytest.approx(r2_score(100 + 50 * target, 100 + 50 * pred), rel=1e-6)
    assert metrics["rmse"] == pytest.approx(50 * np.sqrt(np.mean((pred - target) ** 2)), rel=1e-6)


@pytest.mark.parametrize("loss", ["squared", "huber"])
def test_fused_regression_learns_a_linear_target(loss: str) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 4)).astype(np.float32)
    y = (x @ np.array([0.3, -0.2, 0.1, 0.0]) + 0.1).astype(np.float32)
    spec = ModelSpec(kind="logreg", n_features=4, n_classes=1, task="regression", loss=loss)
    plan = FusedPlan(
        learning_rate=0.5,
        momentum=0.0,
        batch_size=200,
        steps=300,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        private=False,
        secure_mode=False,
        sample_rate=0.1,
    )
    params, _ = train_fused(spec, init_parameters(spec, 0), x, y, plan, seed=0)
    pred = x @ params[0][0] + params[1][0]
    assert 1 - np.mean((pred - y) ** 2) / np.var(y) > 0.99


def test_a_regression_spec_has_one_output_and_a_regression_loss() -> None:
    with pytest.raises(ValueError, match="exactly one output"):
        ModelSpec(kind="logreg", n_features=2, n_classes=2, task="regression", loss="squared")
    with pytest.raises(ValueError, match="'squared' or 'huber'"):
        ModelSpec(kind="logreg", n_features=2, n_classes=1, task="regression")
    with pytest.raises(ValueError, match="cross-entropy"):
        ModelSpec(kind="logreg", n_features=2, n_classes=2, loss="huber")


# --------------------------------------------------------------------------- demo tables


@pytest.mark.parametrize("name", ["flchain", "diamonds", "penguins"])
def test_demo_tables_split_and_load(tmp_path: Path, name: str) -> None:
    manifest = split_dataset(name, tmp_path / name, partners=3, seed=0)
    schema = builtin_schema(name)
    total = 0
    for split in manifest.partner_splits:
        for part in ("train", "test"):
            data = load_partner_csv(tmp_path / name / split.partner / f"{part}.csv", schema)
            assert data.features.shape[1] == encoding_for(schema).width
            total += data.n_rows
    assert total == manifest.total_rows == len(load_table(name).rows)


def test_flchain_keeps_its_gaps_and_leaves_out_leaking_columns(tmp_path: Path) -> None:
    table = load_table("flchain")
    assert len(table.rows) == 7874
    assert table.header[-2:] == ("futime", "chapter")  # carried, declared ignored
    creatinine = table.header.index("creatinine")
    assert sum(row[creatinine] == "NA" for row in table.rows) == 1350
    diamonds = load_table("diamonds")
    assert len(diamonds.rows) == 53940
    assert len(diamonds.strata_names) == 5  # quantile bins of the price


def test_a_draft_copies_no_value_and_is_refused_until_filled(tmp_path: Path) -> None:
    from fedvault.cli.schemas import draft_schema, render_draft

    header = ["patient_id", "age", "ward", "smoker", "crp", "outcome"]
    rows = [["p17", "43", "B7", "yes", "13.25", "yes"], ["p18", "71", "C2", "no", "NA", "no"]]
    schema, gaps = draft_schema(header, rows, name="clinic", label="outcome")
    text = render_draft(schema, gaps, [])
    for private in ("43", "71", "B7", "C2", "13.25", "p17"):
        assert private not in text
    assert [f.type for f in schema.features] == [
        "categorical",
        "int",
        "categorical",
        "boolean",
        "float",
    ]
    assert gaps == ["crp"]
    path = tmp_path / "draft.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="is a draft"):
        load_schema(path)
    draft = load_schema(path, allow_draft=True)
    assert set(draft.placeholders) == {"patient_id", "age", "ward", "crp", "outcome"}
    with pytest.raises(ConfigError, match="column 1 has no name"):
        draft_schema(["", "age", "outcome"], [], name="x", label="outcome")


def test_dp_bounds_cover_the_bulk_and_cost_what_is_charged() -> None:
    from fedvault.bounds import EDGES, bounds_from_counts, noisy_histograms, summed_noise_std

    rng = np.random.default_rng(5)
    ages = rng.integers(50, 102, size=6000).astype(np.float64)
    ages[:50] = np.nan  # missing values are not counted
    parts = [noisy_histograms([ages[i::3]], 2.0, rng) for i in range(3)]
    found = bounds_from_counts(sum(parts)[0], summed_noise_std([2.0] * 3, 1), integer=True)
    assert found is not None
    assert found.min <= np.nanquantile(ages, 0.005)
    assert found.max >= np.nanquantile(ages, 0.995)
    assert found.min >= 40
    assert found.max <= 135
    assert found.count == pytest.approx(5950, abs=100)
    # The noise is σ·√c per bin: for 4 columns, twice that of one.
    zeros = [np.zeros(0)] * 4
    spread = np.std([noisy_histograms(zeros, 1.0, rng)[0, 10] for _ in range(4000)])
    assert spread == pytest.approx(2.0, rel=0.06)
    assert len(EDGES) == 259


def test_out_of_range_clip_is_a_policy(tmp_path: Path) -> None:
    schema = _clinic(tmp_path, CLINIC.replace("max = 120\n", 'max = 120\nout_of_range = "clip"\n'))
    data = load_partner_csv(
        _write(tmp_path, "outcome,age,ward,smoker,crp\nyes,140,A,1,1\nno,-3,A,1,1\n"), schema
    )
    assert data.features[:, 0].tolist() == [120, 0]
    with pytest.raises(ConfigError, match="out_of_range applies to numeric"):
        _clinic(
            tmp_path, CLINIC.replace('other = "other"', 'other = "other"\nout_of_range = "clip"')
        )


def test_an_mlp_learns_a_regression_target_and_compiles_for_he() -> None:
    from fedvault.modelspec import forward
    from fedvault.stats import Scaler
    from secure.he.plan import compile_plan

    rng = np.random.default_rng(4)
    x = rng.normal(size=(3000, 3)).astype(np.float32)
    y = np.clip(0.4 * x[:, 0] * x[:, 1] + 0.2 * x[:, 2], -1, 1).astype(np.float32)
    spec = ModelSpec(
        kind="mlp",
        n_features=3,
        n_classes=1,
        task="regression",
        loss="huber",
        hidden=16,
        activation="quad",
        quad_alpha=0.5,
    )
    plan = FusedPlan(
        learning_rate=0.1,
        momentum=0.9,
        batch_size=100,
        steps=1500,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        private=False,
        secure_mode=False,
        sample_rate=1 / 30,
    )
    params, _ = train_fused(spec, init_parameters(spec, 0), x, y, plan, seed=0)
    metrics = summarise(spec, partner_sums(spec, params, x, y))
    assert metrics["r2"] is not None
    assert metrics["r2"] > 0.8
    # Under HE the plan's single output is the rescaled target, as the plaintext forward pass.
    scaler = Scaler(np.array([0.1, -0.2, 0.3]), np.array([1.5, 0.5, 2.0]))
    he_plan = compile_plan(spec, params, scaler)
    assert he_plan.n_outputs == 1
    np.testing.assert_allclose(
        he_plan.forward(x[:50]), forward(spec, params, scaler.apply(x[:50])), rtol=1e-4, atol=1e-5
    )


def test_quoting_pyarrow_would_forgive_goes_to_the_exact_path(tmp_path: Path) -> None:
    from clients.arrow_csv import load_with_arrow

    schema = _clinic(tmp_path)
    path = _write(tmp_path, 'outcome,age,ward,smoker,crp\nyes,"1"2,A,1,1\n')
    assert load_with_arrow(path, schema, "utf-8", None) is None
    with pytest.raises(DataError, match="malformed CSV") as info:
        load_partner_csv(path, schema)
    assert info.value.line == 2


def test_gateway_values_follow_the_file_rules(tmp_path: Path) -> None:
    schema = _clinic(tmp_path, CLINIC.replace('other = "other"\n', 'missing = "mean"\n'))
    ward = schema.features[1]
    markers = frozenset(schema.missing_values)
    codes = typed_values(ward, np.array([" B ", "NA", None, "A"], dtype=object), markers)
    assert codes.tolist() == [1, -1, -1, 0]  # stripped; NA and None are missing, as in files
    tight = schema.features[0].model_copy(update={"min": 0.0, "max": 0.1, "type": "float"})
    # 0.1 sent as FP32 is the bound itself, not a value above it.
    assert typed_values(tight, np.array([0.1], dtype=np.float32)).tolist() == [0.1]
    with pytest.raises(InvalidValue, match="outside"):
        typed_values(tight, np.array([0.1001], dtype=np.float32))


def test_a_refusal_carries_no_cell_value() -> None:
    from clients.data import without_cells

    text = (
        "file a.csv, line 9, column 'ward': unknown category 'HIV+ ward', expected one of 'A', 'B'"
    )
    assert "HIV+" not in without_cells(text)
    assert "line 9, column 'ward'" in without_cells(text)
    assert "250" not in without_cells("value 250 outside the schema range [0, 120]")
    assert "abc" not in without_cells("expected an integer, got 'abc'")


def test_a_site_refuses_a_run_for_another_table(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord

    from clients.app import NodeSettings, Refusal, _run_schema
    from fedvault.schema import to_json

    settings = NodeSettings.from_node_config(
        {
            "partner": "alpha",
            "train-csv": "t.csv",
            "test-csv": "s.csv",
            "ledger": "l.db",
            "epsilon-cap": 3.0,
            "dataset": "flchain",
        }
    )
    run = ConfigRecord({"schema": to_json(builtin_schema("flchain"))})
    assert _run_schema(run, settings).name == "flchain"
    renamed = builtin_schema("flchain").model_copy(update={"name": "flchain-again"})
    with pytest.raises(Refusal, match="holds table 'flchain'"):
        _run_schema(ConfigRecord({"schema": to_json(renamed)}), settings)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("min = 0\nmax = 500", "min = -1e308\nmax = 1e308"), "must be a finite number"),
        (('categories = ["A", "B", "other"]', 'categories = ["A", "NA", "other"]'), "markers"),
        (('name = "crp"', 'name = "ward=A"'), "would repeat"),
        (("min = 0\nmax = 120", "min = 0.2\nmax = 0.8"), "no integer"),
    ],
)
def test_schemas_that_would_break_later_are_refused_now(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    text = CLINIC.replace(*change)
    assert text != CLINIC
    with pytest.raises(ConfigError, match=message):
        _clinic(tmp_path, text)


def test_one_row_moves_the_stats_release_by_at_most_its_sensitivity() -> None:
    """Add/remove one row of a mixed table (one-hot, indicators, gaps, values
    beyond the bounds): the release's L2 change is at most √(2d + 1)."""
    schema = builtin_schema("flchain")
    enc = encoding_for(schema)
    rng = np.random.default_rng(9)
    n = 200
    typed = [
        rng.uniform(-100, 300, n),  # far outside [40, 110]: the release clips
        np.where(rng.random(n) < 0.5, 0, 1),
        rng.uniform(1990, 2005, n),
        rng.uniform(0, 50, n),
        rng.uniform(0, 50, n),
        rng.integers(1, 11, n).astype(np.float64),
        np.where(rng.random(n) < 0.3, np.nan, rng.uniform(0, 15, n)),
        rng.integers(0, 2, n).astype(np.float64),
    ]
    x = enc.encode(typed)
    bound = math.sqrt(2 * enc.width + 1)
    for row in x:
        one = noisy_sums(row[None, :], enc, 0.0, rng)
        vector = np.concatenate([one.sum, one.sum_sq, [one.count]])
        assert np.linalg.norm(vector) <= bound + 1e-9


def test_a_lone_noisy_bin_far_from_the_data_does_not_move_a_bound() -> None:
    from fedvault.bounds import N_BINS, bounds_from_counts

    counts = np.zeros(N_BINS)
    counts[192:196] = [1500.0, 2800.0, 1000.0, 40.0]  # the bulk: ages 42-133
    counts[160] = 145.0  # one empty bin's noise past the threshold, near 0.004
    found = bounds_from_counts(counts, 26.6, integer=True)
    assert found is not None
    assert (found.min, found.max) == (42.0, 100.0)  # the 40 in [100, 133) is below 5σ
