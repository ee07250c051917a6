"""fedvault.schema: models, validators, hashing, JSON round trip, built-in schemas."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedvault.errors import ConfigError
from fedvault.schema import (
    DataSchema,
    FeatureSpec,
    builtin_schema,
    from_json,
    round_bound,
    schema_hash,
    to_json,
)


def _schema(**overrides: object) -> DataSchema:
    fields: dict[str, object] = {
        "name": "toy",
        "features": (
            FeatureSpec(name="a", type="float", min=0, max=1),
            FeatureSpec(name="b", type="int", min=-5, max=5),
        ),
        "label": "y",
        "classes": ("no", "yes"),
    }
    fields.update(overrides)
    return DataSchema.model_validate(fields)


def test_feature_spec_requires_min_below_max() -> None:
    with pytest.raises(ValidationError, match="min"):
        FeatureSpec(name="a", type="float", min=1, max=1)
    with pytest.raises(ValidationError):
        FeatureSpec(name="a", type="float", min=2, max=1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_feature_spec_rejects_non_finite_bounds(bad: float) -> None:
    with pytest.raises(ValidationError):
        FeatureSpec(name="a", type="float", min=bad, max=1)


@pytest.mark.parametrize("name", ["", " a", "a\n", "x" * 129])
def test_feature_spec_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValidationError):
        FeatureSpec(name=name, type="float", min=0, max=1)


def test_feature_spec_rejects_unknown_dtype_and_extra_fields() -> None:
    with pytest.raises(ValidationError):
        FeatureSpec.model_validate({"name": "a", "type": "str", "min": 0, "max": 1})
    with pytest.raises(ValidationError):
        FeatureSpec.model_validate({"name": "a", "type": "int", "min": 0, "max": 1, "x": 2})


def test_models_are_frozen() -> None:
    schema = _schema()
    with pytest.raises(ValidationError):
        schema.label = "z"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        schema.features[0].max = 3  # type: ignore[misc]


def test_schema_validators() -> None:
    a = FeatureSpec(name="a", type="float", min=0, max=1)
    with pytest.raises(ValidationError, match="duplicate feature"):
        _schema(features=(a, a))
    with pytest.raises(ValidationError, match="also a feature"):
        _schema(label="a")
    with pytest.raises(ValidationError, match="at least 2 classes"):
        _schema(classes=("only",))
    with pytest.raises(ValidationError, match="duplicate class"):
        _schema(classes=("x", "y", "x"))
    with pytest.raises(ValidationError):
        _schema(features=())


def test_schema_helpers() -> None:
    schema = _schema()
    assert schema.feature_names == ("a", "b")
    assert schema.columns == ("a", "b", "y")


def test_schema_hash_is_sha256_of_canonical_json() -> None:
    schema = _schema()
    canonical = json.dumps(schema.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert schema_hash(schema) == hashlib.sha256(canonical.encode()).hexdigest()
    assert schema_hash(schema) == schema_hash(from_json(to_json(schema)))
    assert schema_hash(schema) != schema_hash(_schema(classes=("yes", "no")))


def test_json_round_trip() -> None:
    for schema in (_schema(), builtin_schema("digits"), builtin_schema("breast-cancer")):
        assert from_json(to_json(schema)) == schema
        assert from_json(to_json(schema).encode()) == schema


def test_from_json_reports_field_path() -> None:
    data = json.loads(to_json(_schema()))
    data["features"][1]["type"] = "complex"
    with pytest.raises(ConfigError, match=r"features\.1\.type"):
        from_json(json.dumps(data))
    data = json.loads(to_json(_schema()))
    data["features"][0]["min"] = 7
    with pytest.raises(ConfigError, match=r"features\.0"):
        from_json(json.dumps(data))
    with pytest.raises(ConfigError, match="invalid data schema"):
        from_json("{not json")
    with pytest.raises(ConfigError, match="classes"):
        from_json(json.dumps({**json.loads(to_json(_schema())), "classes": ["one"]}))


def test_builtin_digits() -> None:
    schema = builtin_schema("digits")
    assert schema.feature_names == tuple(f"px_{i}" for i in range(64))
    assert all(f.type == "int" and (f.min, f.max) == (0, 16) for f in schema.features)
    assert schema.label == "digit"
    assert schema.classes == tuple(str(i) for i in range(10))


def test_builtin_breast_cancer_matches_sklearn_and_bounds_rule() -> None:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    schema = builtin_schema("breast-cancer")
    assert schema.feature_names == tuple(n.replace(" ", "_") for n in bunch.feature_names)
    assert schema.feature_names[0] == "mean_radius"
    assert schema.label == "diagnosis"
    assert schema.classes == tuple(bunch.target_names) == ("malignant", "benign")
    for spec, column in zip(schema.features, bunch.data.T, strict=True):
        assert spec.type == "float"
        assert spec.min == 0 <= column.min()
        assert spec.max == round_bound(math.ceil(column.max() * 1.5))
        assert column.max() * 1.5 <= spec.max


def test_round_bound() -> None:
    assert [round_bound(v) for v in (0.2, 1, 1.5, 2, 3, 6, 43, 100, 101, 3752)] == [
        1,
        1,
        2,
        2,
        5,
        10,
        50,
        100,
        200,
        5000,
    ]


def test_builtin_unknown_dataset() -> None:
    with pytest.raises(ConfigError, match="dataset"):
        builtin_schema("iris")  # type: ignore[arg-type]


def test_schema_module_does_not_import_sklearn() -> None:
    code = (
        "import sys, fedvault.schema as s, clients.data; s.builtin_schema('breast-cancer');"
        "import fedvault.datasets;"
        "bad = [m for m in ('sklearn', 'torch') if m in sys.modules]; assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)
