"""The data schema a federation agrees on: feature names, types, public bounds, classes.

Pure domain code shared by the partner side (``clients/``) and the server side
(``server/``); it does no I/O and imports neither sklearn nor torch, so a partner
node can import it on its hot path.

Feature bounds (``FeatureSpec.min``/``max``) are *public domain knowledge* fixed in
the schema before any training. They are never learned from partner data at run
time: later stages clip values to them before computing differentially private
statistics, and bounds derived from private data would themselves leak it.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedvault.errors import ConfigError

__all__ = [
    "BUILTIN_DATASETS",
    "BuiltinDataset",
    "DataSchema",
    "FeatureSpec",
    "builtin_schema",
    "from_json",
    "round_bound",
    "schema_hash",
    "to_json",
]

BuiltinDataset = Literal["breast-cancer", "digits"]
BUILTIN_DATASETS: tuple[BuiltinDataset, ...] = ("breast-cancer", "digits")

_MAX_NAME_LEN = 128


def _check_name(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"{what} must not be empty")
    if value != value.strip():
        raise ValueError(f"{what} must not start or end with whitespace")
    if len(value) > _MAX_NAME_LEN:
        raise ValueError(f"{what} must be at most {_MAX_NAME_LEN} characters")
    if any(not ch.isprintable() for ch in value):
        raise ValueError(f"{what} must not contain control characters")
    return value


class FeatureSpec(BaseModel):
    """One numeric feature column and its public domain bounds [min, max]."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: Literal["float", "int"]
    min: float = Field(allow_inf_nan=False)
    max: float = Field(allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value, "feature name")

    @model_validator(mode="after")
    def _min_below_max(self) -> Self:
        if not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be less than max ({self.max})")
        return self


class DataSchema(BaseModel):
    """Features (in model input order), the label column and its class names.

    Class ``i`` of ``classes`` is encoded as integer label ``i``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    features: tuple[FeatureSpec, ...] = Field(min_length=1)
    label: str
    classes: tuple[str, ...]

    @field_validator("name")
    @classmethod
    def _valid_schema_name(cls, value: str) -> str:
        return _check_name(value, "schema name")

    @field_validator("label")
    @classmethod
    def _valid_label(cls, value: str) -> str:
        return _check_name(value, "label column name")

    @field_validator("classes")
    @classmethod
    def _valid_classes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) < 2:
            raise ValueError("at least 2 classes are required")
        for item in value:
            _check_name(item, "class name")
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate class names: {', '.join(map(repr, dupes))}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names: {', '.join(map(repr, dupes))}")
        if self.label in names:
            raise ValueError(f"label column {self.label!r} is also a feature name")
        return self

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Feature names in model input order."""
        return tuple(f.name for f in self.features)

    @property
    def columns(self) -> tuple[str, ...]:
        """All CSV columns: the features followed by the label."""
        return (*self.feature_names, self.label)


def _canonical(schema: DataSchema) -> str:
    return json.dumps(schema.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def schema_hash(schema: DataSchema) -> str:
    """SHA-256 hex digest of the schema's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(_canonical(schema).encode("utf-8")).hexdigest()


def to_json(schema: DataSchema) -> str:
    """Human-readable JSON (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(schema.model_dump(mode="json"), sort_keys=True, indent=2) + "\n"


def from_json(text: str | bytes) -> DataSchema:
    """Parse and validate a schema; raise :class:`ConfigError` naming the bad fields."""
    try:
        return DataSchema.model_validate_json(text)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(part) for part in err["loc"]) or "<root>"
            problems.append(f"{where}: {err['msg']}")
        raise ConfigError("invalid data schema: " + "; ".join(problems)) from None


# Breast-cancer feature names (sklearn ``load_breast_cancer().feature_names`` made
# snake_case) with their public upper bounds. Derived once, offline, from the copy of
# the Wisconsin diagnostic data set that scikit-learn ships (public data, not partner
# data): upper = the smallest of 1, 2, 5, 10, 20, 50, ... that is >= ceil(1.5 * max).
# Every feature is a non-negative measurement, so the lower bound is 0.
# tests/test_data_schema.py re-derives this table from sklearn to keep it honest.
_BREAST_CANCER_BOUNDS: tuple[tuple[str, float], ...] = (
    ("mean_radius", 50),
    ("mean_texture", 100),
    ("mean_perimeter", 500),
    ("mean_area", 5000),
    ("mean_smoothness", 1),
    ("mean_compactness", 1),
    ("mean_concavity", 1),
    ("mean_concave_points", 1),
    ("mean_symmetry", 1),
    ("mean_fractal_dimension", 1),
    ("radius_error", 5),
    ("texture_error", 10),
    ("perimeter_error", 50),
    ("area_error", 1000),
    ("smoothness_error", 1),
    ("compactness_error", 1),
    ("concavity_error", 1),
    ("concave_points_error", 1),
    ("symmetry_error", 1),
    ("fractal_dimension_error", 1),
    ("worst_radius", 100),
    ("worst_texture", 100),
    ("worst_perimeter", 500),
    ("worst_area", 10000),
    ("worst_smoothness", 1),
    ("worst_compactness", 2),
    ("worst_concavity", 2),
    ("worst_concave_points", 1),
    ("worst_symmetry", 1),
    ("worst_fractal_dimension", 1),
)


def round_bound(value: float) -> float:
    """Smallest number of the form {1, 2, 5} x 10^k (k >= 0) that is >= ceil(value)."""
    target = max(1, math.ceil(value))
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale >= target:
                return float(mantissa * scale)
        scale *= 10


def builtin_schema(dataset: BuiltinDataset) -> DataSchema:
    """The fixed schema of a built-in demo dataset (needs no sklearn)."""
    if dataset == "breast-cancer":
        return DataSchema(
            name="breast-cancer",
            features=tuple(
                FeatureSpec(name=name, dtype="float", min=0.0, max=float(upper))
                for name, upper in _BREAST_CANCER_BOUNDS
            ),
            label="diagnosis",
            classes=("malignant", "benign"),  # sklearn target 0 = malignant, 1 = benign
        )
    if dataset == "digits":
        return DataSchema(
            name="digits",
            features=tuple(
                FeatureSpec(name=f"px_{i}", dtype="int", min=0.0, max=16.0) for i in range(64)
            ),
            label="digit",
            classes=tuple(str(d) for d in range(10)),
        )
    raise ConfigError(
        f"dataset: unknown built-in dataset {dataset!r}, expected one of "
        + ", ".join(map(repr, BUILTIN_DATASETS))
    )
