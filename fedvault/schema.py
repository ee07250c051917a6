"""The data schema a federation agrees on: columns, types, public bounds, task.

Pure domain code shared by the partner side (``clients/``) and the server side
(``server/``); it reads TOML and the shipped schema files but imports neither
sklearn nor torch, so a partner node can import it on its hot path.

A schema is written once by the operator (``schema.toml``, see
``docs/own-data.md``; its JSON Schema is ``docs/schema.schema.json``) and
travels to every partner with each run. Everything in it is *public*: bounds,
category lists, the class list and the regression target's range are domain
knowledge fixed before any training. They are never learned from partner data
at run time: later stages clip values to them before computing differentially
private statistics, and bounds derived from private data would themselves leak
it. A bound that came from the federation's DP quantile release says so
(``bounds = "dp"``); a drafted one that nobody filled in yet
(``bounds = "placeholder"``) makes the schema a draft, which training refuses.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedvault.errors import ConfigError

__all__ = [
    "BUILTIN_DATASETS",
    "DataSchema",
    "FeatureSpec",
    "TargetSpec",
    "builtin_schema",
    "from_json",
    "json_schema",
    "load_schema",
    "parse_schema",
    "round_bound",
    "schema_hash",
    "to_json",
    "to_toml",
]

# Shipped schema files (fedvault/schemas/NAME.toml), one per demo table.
BUILTIN_DATASETS: tuple[str, ...] = ("breast-cancer", "digits", "flchain", "diamonds", "penguins")

Task = Literal["binary", "multiclass", "regression"]
FeatureType = Literal["float", "int", "categorical", "boolean"]
MissingPolicy = Literal["refuse", "constant", "mean"]
BoundsSource = Literal["domain", "dp", "placeholder"]
OutOfRange = Literal["refuse", "clip"]

DEFAULT_MISSING_VALUES: tuple[str, ...] = ("", "NA", "NaN", "null")
# Class names a draft writes for the operator to replace.
PLACEHOLDER_CLASS = "PLACEHOLDER-"
_MAX_NAME_LEN = 128
_MAX_CATEGORIES = 1000
# Spelling of booleans accepted in data files (compared case-insensitively).
TRUE_WORDS = frozenset({"true", "1", "yes", "y", "t"})
FALSE_WORDS = frozenset({"false", "0", "no", "n", "f"})


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


def _duplicates(values: tuple[str, ...] | list[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({v for v in values if v in seen or seen.add(v)})  # type: ignore[func-returns-value]


class FeatureSpec(BaseModel):
    """One input column: its type, public domain, and what a missing value gets.

    - ``float``/``int``: ``min``/``max`` are public bounds (values outside are
      refused); ``log1p`` models ``log(1 + x)`` instead of ``x`` (needs
      ``min > -1``): for skewed positive quantities such as prices or lab values.
    - ``categorical``: ``categories`` are the declared values; an undeclared
      value is refused unless ``other`` names the category it maps to.
    - ``boolean``: true/false, 1/0, yes/no (any case).

    ``missing``: ``refuse`` (the row is an error), ``constant`` (``fill``, a
    public value of the column's type) or ``mean`` (the federation's DP mean,
    plus a missing-indicator input so the model can tell imputed rows apart).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    type: FeatureType
    min: float | None = Field(default=None, allow_inf_nan=False)
    max: float | None = Field(default=None, allow_inf_nan=False)
    log1p: bool = Field(default=False, strict=True)
    categories: tuple[str, ...] | None = None
    other: str | None = None
    missing: MissingPolicy = "refuse"
    fill: float | str | bool | None = None
    bounds: BoundsSource = "domain"
    # A value outside [min, max]: an error, or clipped to the bound (the usual
    # choice for bounds from the federation's DP quantiles, which leave out
    # the extreme ~0.5 % at each end).
    out_of_range: OutOfRange = "refuse"

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value, "feature name")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        numeric = self.type in ("float", "int")
        if numeric:
            self._check_numeric()
        else:
            if self.min is not None or self.max is not None:
                raise ValueError(f"min/max apply to numeric features, not {self.type!r}")
            if self.log1p:
                raise ValueError(f"log1p applies to numeric features, not {self.type!r}")
            if self.out_of_range != "refuse":
                raise ValueError(f"out_of_range applies to numeric features, not {self.type!r}")
        if self.type == "categorical":
            self._check_categorical()
        elif self.categories is not None or self.other is not None:
            raise ValueError("categories/other apply to categorical features only")
        self._check_fill()
        return self

    def _check_numeric(self) -> None:
        if self.min is None or self.max is None:
            if self.bounds == "placeholder":
                return
            raise ValueError(
                f"numeric feature {self.name!r} needs public bounds min and max "
                "(domain knowledge, or bounds from `fedvault schema draft --dp-bounds`)"
            )
        if not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be less than max ({self.max})")
        if not math.isfinite(self.max - self.min):
            raise ValueError("max - min must be a finite number (the range is rescaled by it)")
        if self.type == "int" and math.floor(self.max) < math.ceil(self.min):
            raise ValueError(f"no integer lies in [{self.min}, {self.max}]")
        if self.log1p and self.min <= -1:
            raise ValueError(f"log1p needs min > -1, got {self.min}")

    def _check_categorical(self) -> None:
        if self.categories is None:
            if self.bounds == "placeholder":
                return
            raise ValueError(f"categorical feature {self.name!r} needs its declared categories")
        if len(self.categories) < 1:
            raise ValueError("categories must not be empty")
        if len(self.categories) > _MAX_CATEGORIES:
            raise ValueError(f"at most {_MAX_CATEGORIES} categories per feature")
        for category in self.categories:
            _check_name(category, "category")
        dupes = _duplicates(self.categories)
        if dupes:
            raise ValueError(f"duplicate categories: {', '.join(map(repr, dupes))}")
        if self.other is not None and self.other not in self.categories:
            raise ValueError(f"other ({self.other!r}) must be one of the declared categories")

    def _check_fill(self) -> None:
        if self.missing != "constant":
            if self.fill is not None:
                raise ValueError("fill applies only to missing = 'constant'")
            return
        if self.fill is None:
            raise ValueError("missing = 'constant' needs a fill value")
        if self.type in ("float", "int"):
            if isinstance(self.fill, bool) or not isinstance(self.fill, (int, float)):
                raise ValueError("fill of a numeric feature must be a number")
            if self.min is not None and self.max is not None:
                if not self.min <= float(self.fill) <= self.max:
                    raise ValueError(f"fill ({self.fill}) must lie in [min, max]")
            if self.type == "int" and not float(self.fill).is_integer():
                raise ValueError("fill of an int feature must be an integer")
        elif self.type == "boolean":
            if not isinstance(self.fill, bool):
                raise ValueError("fill of a boolean feature must be true or false")
        elif not isinstance(self.fill, str) or (
            self.categories is not None and self.fill not in self.categories
        ):
            raise ValueError("fill of a categorical feature must be one of its categories")

    @property
    def numeric(self) -> bool:
        return self.type in ("float", "int")

    @property
    def is_placeholder(self) -> bool:
        return self.bounds == "placeholder"


def _input_names(feature: FeatureSpec) -> list[str]:
    """The model-input names a feature encodes to (see fedvault.encoding)."""
    if feature.type == "categorical":
        names = [f"{feature.name}={c}" for c in feature.categories or ()]
    else:
        names = [feature.name]
    if feature.missing == "mean":
        names.append(feature.name + "__missing")
    return names


class TargetSpec(BaseModel):
    """A regression target's public range: predictions are clipped to it and
    the model learns the target rescaled into [-1, 1] by it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min: float = Field(allow_inf_nan=False)
    max: float = Field(allow_inf_nan=False)
    bounds: BoundsSource = "domain"
    out_of_range: OutOfRange = "refuse"

    @model_validator(mode="after")
    def _min_below_max(self) -> Self:
        if not self.min < self.max:
            raise ValueError(f"target min ({self.min}) must be less than max ({self.max})")
        if not math.isfinite(self.max - self.min):
            raise ValueError("target max - min must be a finite number")
        return self


class DataSchema(BaseModel):
    """Features (in model input order), the label column and the task.

    ``binary``/``multiclass``: class ``i`` of ``classes`` is encoded as label
    ``i``. ``regression``: ``target`` gives the label's public range. ``ignore``
    names columns a file may carry (row ids, free text, columns that leak the
    outcome) that are read past and never used.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    task: Task = "multiclass"
    label: str
    classes: tuple[str, ...] = ()
    target: TargetSpec | None = None
    features: tuple[FeatureSpec, ...] = Field(min_length=1)
    ignore: tuple[str, ...] = ()
    missing_values: tuple[str, ...] = DEFAULT_MISSING_VALUES

    @field_validator("name")
    @classmethod
    def _valid_schema_name(cls, value: str) -> str:
        return _check_name(value, "schema name")

    @field_validator("label")
    @classmethod
    def _valid_label(cls, value: str) -> str:
        return _check_name(value, "label column name")

    @field_validator("ignore")
    @classmethod
    def _valid_ignored(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            _check_name(item, "ignored column name")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.task == "regression":
            if self.classes:
                raise ValueError("a regression schema has no classes")
            if self.target is None:
                raise ValueError("a regression schema needs target = {min, max} (public bounds)")
        else:
            if self.target is not None:
                raise ValueError(f"target bounds apply to regression, not {self.task!r}")
            self._check_classes()
        names = [f.name for f in self.features]
        dupes = _duplicates(names)
        if dupes:
            raise ValueError(f"duplicate feature names: {', '.join(map(repr, dupes))}")
        if self.label in names:
            raise ValueError(f"label column {self.label!r} is also a feature name")
        clash = sorted(set(self.ignore) & {*names, self.label})
        if clash:
            raise ValueError(f"ignored column(s) {', '.join(map(repr, clash))} are also used")
        markers = set(self.missing_values)
        for feature in self.features:
            hidden = sorted(markers & set(feature.categories or ()))
            if hidden:
                raise ValueError(
                    f"feature {feature.name!r}: categor(ies) {', '.join(map(repr, hidden))} "
                    "are also missing-value markers, so no cell could ever be one"
                )
        hidden = sorted(markers & set(self.classes))
        if hidden:
            raise ValueError(f"class(es) {', '.join(map(repr, hidden))} are missing-value markers")
        inputs = [name for f in self.features for name in _input_names(f)]
        dupes = _duplicates(inputs)
        if dupes:
            raise ValueError(
                f"model input name(s) {', '.join(map(repr, dupes))} would repeat "
                "(a feature named like another's category or missing indicator)"
            )
        return self

    def _check_classes(self) -> None:
        value = self.classes
        if self.task == "binary" and len(value) != 2:
            raise ValueError(f"a binary task needs exactly 2 classes, got {len(value)}")
        if len(value) < 2:
            raise ValueError("at least 2 classes are required")
        for item in value:
            _check_name(item, "class name")
        dupes = _duplicates(value)
        if dupes:
            raise ValueError(f"duplicate class names: {', '.join(map(repr, dupes))}")

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Feature names in model input order."""
        return tuple(f.name for f in self.features)

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns a file must carry: the features followed by the label."""
        return (*self.feature_names, self.label)

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    @property
    def n_outputs(self) -> int:
        """Model outputs: one logit per class, or one value for regression."""
        return 1 if self.is_regression else len(self.classes)

    @property
    def all_numeric(self) -> bool:
        """True when a plain numeric matrix of the features is a valid input."""
        return all(f.type != "categorical" for f in self.features)

    @property
    def placeholders(self) -> tuple[str, ...]:
        """Features whose bounds or categories a draft left for the operator."""
        names = [f.name for f in self.features if f.is_placeholder]
        if self.target is not None and self.target.bounds == "placeholder":
            names.append(self.label)
        if any(c.startswith(PLACEHOLDER_CLASS) for c in self.classes):
            names.append(self.label)
        return tuple(names)

    def require_complete(self) -> None:
        """Refuse a drafted schema whose placeholders nobody filled in."""
        missing = self.placeholders
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise ConfigError(
                f"schema {self.name!r} is a draft: set public bounds or categories for {shown} "
                "from domain knowledge (or ask the federation: `fedvault schema draft "
                "--dp-bounds`) and mark them bounds = 'domain'"
            )


def _canonical(schema: DataSchema) -> str:
    return json.dumps(schema.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def schema_hash(schema: DataSchema) -> str:
    """SHA-256 hex digest of the schema's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(_canonical(schema).encode("utf-8")).hexdigest()


def to_json(schema: DataSchema) -> str:
    """Human-readable JSON (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(schema.model_dump(mode="json"), sort_keys=True, indent=2) + "\n"


def _problems(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in err["loc"]) or "<root>"
        problems.append(f"{where}: {err['msg']}")
    return "; ".join(problems)


def from_json(text: str | bytes) -> DataSchema:
    """Parse and validate a schema; raise :class:`ConfigError` naming the bad fields."""
    try:
        return DataSchema.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError("invalid data schema: " + _problems(exc)) from None


def parse_schema(data: dict[str, Any], *, source: str) -> DataSchema:
    """Validate a schema mapping (a parsed TOML file), naming ``source`` in errors."""
    try:
        return DataSchema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid data schema: {_problems(exc)}") from None


def load_schema(path: Path | str, *, allow_draft: bool = False) -> DataSchema:
    """Read a ``schema.toml`` (or a ``.json`` schema); refuse drafts unless asked."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"schema file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"schema file {path} cannot be read ({reason})") from None
    if path.suffix == ".json":
        try:
            schema = DataSchema.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(f"{path}: invalid data schema: {_problems(exc)}") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"schema file {path} is not valid TOML: {exc}") from None
        schema = parse_schema(data, source=str(path))
    if not allow_draft:
        schema.require_complete()
    return schema


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``schema.toml`` (published for editors' completion)."""
    document = DataSchema.model_json_schema()
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["$id"] = "https://fedvault.dev/schema.schema.json"
    document["title"] = "fedvault data schema (schema.toml)"
    return document


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        number = float(value)
        return str(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def to_toml(schema: DataSchema) -> str:
    """The schema as a ``schema.toml`` file (defaults left out)."""
    data = schema.model_dump(mode="json", exclude_defaults=True)
    lines: list[str] = []
    for key, value in data.items():
        if key not in ("features", "target"):
            lines.append(f"{key} = {_toml_value(value)}")
    if "target" in data:
        lines += ["", "[target]"] + [f"{k} = {_toml_value(v)}" for k, v in data["target"].items()]
    for feature in data["features"]:
        lines += ["", "[[features]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in feature.items()]
    return "\n".join(lines) + "\n"


def round_bound(value: float) -> float:
    """Smallest number of the form {1, 2, 5} x 10^k (k >= 0) that is >= ceil(value)."""
    target = max(1, math.ceil(value))
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale >= target:
                return float(mantissa * scale)
        scale *= 10


def builtin_schema(dataset: str) -> DataSchema:
    """The shipped schema file of a demo table (``fedvault/schemas/NAME.toml``)."""
    if dataset not in BUILTIN_DATASETS:
        raise ConfigError(
            f"dataset: unknown built-in dataset {dataset!r}, expected one of "
            + ", ".join(map(repr, BUILTIN_DATASETS))
            + " (or a schema file of your own: schema = 'path/to/schema.toml')"
        )
    text = resources.files("fedvault.schemas").joinpath(f"{dataset}.toml").read_text("utf-8")
    return parse_schema(tomllib.loads(text), source=f"built-in schema {dataset}")


def lineage_schema(lineage: dict[str, Any]) -> DataSchema | None:
    """The schema a registered model was trained on: stored in its lineage, or,
    for models registered before schemas travelled with them, the built-in
    table its lineage names. None when neither is known."""
    stored = lineage.get("schema")
    if isinstance(stored, dict):
        return from_json(json.dumps(stored))
    dataset = lineage.get("dataset")
    if isinstance(dataset, str) and dataset in ("breast-cancer", "digits"):
        return builtin_schema(dataset)
    return None
