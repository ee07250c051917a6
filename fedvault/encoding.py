"""From raw columns to the model's numeric input, as the schema declares it.

Pure (numpy only, no I/O): the partner node encodes its files with it, the
coordinator sizes the model with it, the gateway encodes callers' raw columns
with it, so every side speaks the same columns in the same order.

Two stages, so files and OIP tensors share the second:

1. *Typed values* per feature (:func:`parse_cells` for text cells,
   :func:`typed_values` for tensors): ``float64`` for numeric and boolean
   features, ``int64`` category codes for categorical ones. The missing-value
   policy is applied here: ``refuse`` is an error, ``constant`` becomes its
   fill, ``mean`` stays missing (NaN, or code -1).
2. :meth:`Encoding.encode`: numeric and boolean values as one input each
   (``log1p`` applied), categoricals one-hot, and for every ``mean``-imputed
   feature a 0/1 missing indicator. Imputed entries stay NaN here; the model's
   standardisation maps them to 0, which is the federation's DP mean (see
   :mod:`fedvault.stats`). Imputation is thus post-processing of the DP
   statistics release and costs no extra privacy.

Each encoded input has public bounds ``[lo, hi]`` (from the schema: ``[min,
max]``, or ``[0, 1]`` for booleans, one-hot and indicator inputs), which the
DP statistics release clips to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedvault.schema import (
    DEFAULT_MISSING_VALUES,
    FALSE_WORDS,
    TRUE_WORDS,
    DataSchema,
    FeatureSpec,
)

__all__ = [
    "EncodedInput",
    "Encoding",
    "InvalidValue",
    "apply_missing",
    "encoding_for",
    "parse_cells",
    "parse_labels",
    "typed_values",
]

FloatArray = NDArray[np.float64]
MISSING_SUFFIX = "__missing"
_ENCODE_ROWS = 4096
_QUOTE_LIMIT = 40


class InvalidValue(ValueError):
    """The first invalid value of a column: its row (0-based) and what is wrong."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row
        self.message = message


def quote(cell: str) -> str:
    """The single offending cell, quoted and truncated for an error message."""
    return repr(cell if len(cell) <= _QUOTE_LIMIT else cell[:_QUOTE_LIMIT] + "...")


def fmt(value: float) -> str:
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(quote(n) for n in names[:limit])
    rest = len(names) - limit
    return shown + (f" and {rest} more" if rest > 0 else "")


@dataclass(frozen=True, slots=True)
class EncodedInput:
    """One column of the model's input: where it comes from and its public bounds."""

    name: str
    feature: str
    lo: float
    hi: float


def _bounds(spec: FeatureSpec) -> tuple[float, float]:
    if spec.min is None or spec.max is None:
        raise ValueError(f"feature {spec.name!r} has no bounds yet (a draft schema)")
    return spec.min, spec.max


def _check_bounds(spec: FeatureSpec) -> tuple[float, float]:
    """The range a value is refused outside of: none when the schema clips instead."""
    if spec.out_of_range == "clip":
        return -math.inf, math.inf
    return _bounds(spec)


def _clip(spec: FeatureSpec, values: NDArray[np.float64]) -> NDArray[np.float64]:
    if spec.out_of_range == "clip":
        lo, hi = _bounds(spec)
        np.clip(values, lo, hi, out=values)  # NaN (missing) stays NaN
    return values


def _kind(spec: FeatureSpec) -> str:
    return "an integer" if spec.type == "int" else "a float"


# -- stage 1: typed values -------------------------------------------------


def _number_problem(text: str, spec: FeatureSpec) -> str | None:
    """What is wrong with one non-missing numeric cell, or None. The single
    source of truth for numeric cells; the vectorised path must agree with it."""
    kind = _kind(spec)
    if not text.isascii() or "_" in text:
        return f"expected {kind}, got {quote(text)}"
    try:
        value = float(text)
    except ValueError:
        return f"expected {kind}, got {quote(text)}"
    return _value_problem(value, spec, text)


def _value_problem(value: float, spec: FeatureSpec, text: str) -> str | None:
    if not math.isfinite(value):
        finite = "an integer" if spec.type == "int" else "a finite float"
        return f"expected {finite}, got {quote(text)}"
    if spec.type == "int" and not value.is_integer():
        return f"expected an integer, got {quote(text)}"
    lo, hi = _check_bounds(spec)
    if value < lo or value > hi:
        shown = text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "..."
        return f"value {shown} outside the schema range [{fmt(lo)}, {fmt(hi)}]"
    return None


def _missing_problem(spec: FeatureSpec) -> str:
    if spec.type == "categorical":
        expected = f"one of {_names(spec.categories or ())}"
    elif spec.type == "boolean":
        expected = "true or false"
    else:
        expected = _kind(spec)
    return f"missing value, expected {expected} (the schema refuses missing values here)"


def _fill_value(spec: FeatureSpec) -> float:
    """The ``constant`` policy's fill as a typed value (a code for categoricals)."""
    if spec.type == "categorical":
        return float((spec.categories or ()).index(str(spec.fill)))
    if spec.type == "boolean":
        return 1.0 if spec.fill else 0.0
    return float(spec.fill)  # type: ignore[arg-type]


def apply_missing(spec: FeatureSpec, values: NDArray[Any], missing: NDArray[np.bool_]) -> None:
    """Apply the missing-value policy in place (``refuse`` raises at the first)."""
    if not missing.any():
        return
    if spec.missing == "refuse":
        raise InvalidValue(int(np.argmax(missing)), _missing_problem(spec))
    if spec.missing == "constant":
        values[missing] = _fill_value(spec)
    else:
        values[missing] = -1 if spec.type == "categorical" else np.nan


def parse_cells(
    spec: FeatureSpec, cells: Sequence[str], missing_values: frozenset[str]
) -> NDArray[Any]:
    """Typed values of one feature's text cells, or :class:`InvalidValue` at the first bad one.

    Cells are compared after stripping surrounding whitespace.
    """
    stripped = [c.strip() for c in cells]
    missing = np.fromiter((c in missing_values for c in stripped), dtype=bool, count=len(cells))
    if spec.type == "categorical":
        return _categorical_cells(spec, stripped, missing)
    if spec.type == "boolean":
        return _boolean_cells(spec, stripped, missing)
    values = np.zeros(len(cells), dtype=np.float64)
    present = ~missing
    joined = "\x1f".join(stripped)
    fast = joined.isascii() and "_" not in joined
    if fast:
        try:
            values[present] = np.array(
                [c for c, m in zip(stripped, missing, strict=True) if not m], dtype=np.float64
            )
        except ValueError:
            fast = False
    lo, hi = _check_bounds(spec)
    if fast:
        bad = present & (~np.isfinite(values) | (values < lo) | (values > hi))
        if spec.type == "int":
            with np.errstate(invalid="ignore"):
                bad |= present & (values != np.floor(values))
        if bad.any():
            row = int(np.argmax(bad))
            first_missing = int(np.argmax(missing)) if missing.any() else row + 1
            if spec.missing == "refuse" and first_missing < row:
                raise InvalidValue(first_missing, _missing_problem(spec))
            raise InvalidValue(row, _number_problem(stripped[row], spec) or "invalid value")
    else:
        for row, (text, is_missing) in enumerate(zip(stripped, missing, strict=True)):
            if is_missing:
                if spec.missing == "refuse":
                    raise InvalidValue(row, _missing_problem(spec))
                continue
            problem = _number_problem(text, spec)
            if problem is not None:
                raise InvalidValue(row, problem)
            values[row] = float(text)
    apply_missing(spec, values, missing)
    return _clip(spec, values)


def _categorical_cells(
    spec: FeatureSpec, cells: list[str], missing: NDArray[np.bool_]
) -> NDArray[np.int64]:
    index = {name: i for i, name in enumerate(spec.categories or ())}
    other = -2 if spec.other is None else index[spec.other]
    codes = np.fromiter((index.get(c, other) for c in cells), dtype=np.int64, count=len(cells))
    unknown = (codes == -2) & ~missing
    first_unknown = int(np.argmax(unknown)) if unknown.any() else len(cells)
    first_missing = int(np.argmax(missing)) if missing.any() else len(cells)
    if spec.missing == "refuse" and first_missing < first_unknown:
        raise InvalidValue(first_missing, _missing_problem(spec))
    if first_unknown < len(cells):
        raise InvalidValue(
            first_unknown,
            f"unknown category {quote(cells[first_unknown])}, expected one of "
            f"{_names(spec.categories or ())} (the schema declares no 'other' category)",
        )
    apply_missing(spec, codes, missing)
    return codes


def _boolean_cells(
    spec: FeatureSpec, cells: list[str], missing: NDArray[np.bool_]
) -> NDArray[np.float64]:
    def code(text: str) -> float:
        low = text.lower()
        if low in TRUE_WORDS:
            return 1.0
        if low in FALSE_WORDS:
            return 0.0
        return -1.0

    values = np.fromiter((code(c) for c in cells), dtype=np.float64, count=len(cells))
    bad = (values < 0) & ~missing
    first_bad = int(np.argmax(bad)) if bad.any() else len(cells)
    first_missing = int(np.argmax(missing)) if missing.any() else len(cells)
    if spec.missing == "refuse" and first_missing < first_bad:
        raise InvalidValue(first_missing, _missing_problem(spec))
    if first_bad < len(cells):
        raise InvalidValue(
            first_bad, f"expected true or false (or 1/0, yes/no), got {quote(cells[first_bad])}"
        )
    apply_missing(spec, values, missing)
    return values


def typed_values(
    spec: FeatureSpec,
    values: NDArray[Any],
    missing_values: frozenset[str] = frozenset(DEFAULT_MISSING_VALUES),
) -> NDArray[Any]:
    """Typed values of one feature from a tensor (the gateway's raw-column input).

    Numeric features take numbers (NaN is a missing value); booleans take
    bools or 0/1; categoricals take strings (``bytes`` are UTF-8), stripped
    and compared with the schema's missing markers exactly as file cells are,
    ``None`` being missing too. A float32 value is compared with the bounds
    rounded to float32: 0.1 sent as FP32 is the bound 0.1, not above it.
    """
    n = len(values)
    if spec.type == "categorical":
        cells = []
        missing = np.zeros(n, dtype=bool)
        for i, v in enumerate(values.tolist()):
            if v is None:
                missing[i] = True
                cells.append("")
                continue
            text = (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)).strip()
            cells.append(text)
            missing[i] = text in missing_values
        return _categorical_cells(spec, cells, missing)
    if values.dtype.kind not in "biuf":
        kind = "true or false" if spec.type == "boolean" else _kind(spec)
        raise InvalidValue(0, f"expected {kind}, got {values.dtype.name} values")
    numbers = values.astype(np.float64)
    missing = np.isnan(numbers)
    if spec.type == "boolean":
        bad = ~missing & (numbers != 0) & (numbers != 1)
        if bad.any():
            row = int(np.argmax(bad))
            raise InvalidValue(row, f"expected true or false (1/0), got {fmt(float(numbers[row]))}")
        apply_missing(spec, numbers, missing)
        return numbers
    lo, hi = _check_bounds(spec)
    if values.dtype == np.float32:
        lo = float(np.nextafter(np.float32(lo), np.float32(-np.inf))) if np.isfinite(lo) else lo
        hi = float(np.nextafter(np.float32(hi), np.float32(np.inf))) if np.isfinite(hi) else hi
    bad = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore"):
        bad |= ~missing & (np.isinf(numbers) | (numbers < lo) | (numbers > hi))
        if spec.type == "int":
            bad |= ~missing & ~np.isinf(numbers) & (numbers != np.floor(numbers))
    first_bad = int(np.argmax(bad)) if bad.any() else n
    first_missing = int(np.argmax(missing)) if missing.any() else n
    if spec.missing == "refuse" and first_missing < first_bad:
        raise InvalidValue(first_missing, _missing_problem(spec))
    if first_bad < n:
        value = float(numbers[first_bad])
        raise InvalidValue(first_bad, _value_problem(value, spec, fmt(value)) or "invalid value")
    apply_missing(spec, numbers, missing)
    if values.dtype == np.float32 and spec.out_of_range == "refuse":
        lo, hi = _bounds(spec)
        np.clip(numbers, lo, hi, out=numbers)  # the float32 rounding of a bound, to the bound
    return _clip(spec, numbers)


def parse_labels(schema: DataSchema, cells: Sequence[str]) -> NDArray[Any]:
    """Class indices (``int64``) or regression targets (``float64``) of label cells."""
    stripped = [c.strip() for c in cells]
    if schema.is_regression:
        target = schema.target
        if target is None:  # pragma: no cover - a validated regression schema has one
            raise InvalidValue(0, "the schema gives no target range")
        values = np.empty(len(stripped), dtype=np.float64)
        for row, text in enumerate(stripped):
            if not text or text in schema.missing_values:
                raise InvalidValue(row, "missing target value, expected a number")
            try:
                value = float(text) if text.isascii() and "_" not in text else math.nan
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise InvalidValue(row, f"expected a finite number, got {quote(text)}")
            if target.out_of_range == "clip":
                value = min(max(value, target.min), target.max)
            elif value < target.min or value > target.max:
                raise InvalidValue(
                    row,
                    f"target {quote(text)} outside the schema range "
                    f"[{fmt(target.min)}, {fmt(target.max)}]",
                )
            values[row] = value
        return values
    index = {name: i for i, name in enumerate(schema.classes)}
    labels = np.fromiter((index.get(c, -1) for c in stripped), dtype=np.int64, count=len(cells))
    if (labels < 0).any():
        row = int(np.argmax(labels < 0))
        expected = f"expected one of {_names(schema.classes)}"
        if stripped[row]:
            raise InvalidValue(row, f"unknown label {quote(stripped[row])}, {expected}")
        raise InvalidValue(row, f"missing label, {expected}")
    return labels


# -- stage 2: the model's input ---------------------------------------------


class Encoding:
    """The model-input layout a schema implies, and the encoder into it."""

    def __init__(self, schema: DataSchema) -> None:
        schema.require_complete()
        self.schema = schema
        inputs: list[EncodedInput] = []
        indicator: list[int] = []  # per input: the index of its missing indicator, or -1
        for spec in schema.features:
            first = len(inputs)
            if spec.type == "categorical":
                inputs += [
                    EncodedInput(f"{spec.name}={c}", spec.name, 0.0, 1.0)
                    for c in spec.categories or ()
                ]
            elif spec.type == "boolean":
                inputs.append(EncodedInput(spec.name, spec.name, 0.0, 1.0))
            else:
                lo, hi = _bounds(spec)
                if spec.log1p:
                    lo, hi = math.log1p(lo), math.log1p(hi)
                inputs.append(EncodedInput(spec.name, spec.name, lo, hi))
            count = len(inputs) - first
            if spec.missing == "mean":
                indicator += [len(inputs)] * count
                inputs.append(EncodedInput(spec.name + MISSING_SUFFIX, spec.name, 0.0, 1.0))
                indicator.append(-1)
            else:
                indicator += [-1] * count
        self.inputs: tuple[EncodedInput, ...] = tuple(inputs)
        self.indicator = np.array(indicator, dtype=np.int64)
        self.lo = np.array([i.lo for i in inputs], dtype=np.float64)
        self.hi = np.array([i.hi for i in inputs], dtype=np.float64)

    @property
    def width(self) -> int:
        return len(self.inputs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @cached_property
    def has_missing(self) -> bool:
        """True when some input can be NaN (a ``mean``-imputed feature)."""
        return bool((self.indicator >= 0).any())

    def encode(
        self, typed: Sequence[NDArray[Any]], out: NDArray[np.float32] | None = None
    ) -> NDArray[np.float32]:
        """The model input for typed values in schema feature order (NaN where imputed).

        ``out``: a (rows, width) float32 array to fill, e.g. a slice of a
        whole table's preallocated input, saving a concatenating copy.
        """
        n = len(typed[0]) if typed else 0
        if out is None:
            out = np.empty((n, self.width), dtype=np.float32)
        # Row blocks small enough to stay in cache while every feature writes
        # its (strided) columns: ~3x faster than whole columns into a
        # row-major array, and no transposing copy (bench/data.py).
        for start in range(0, n, _ENCODE_ROWS):
            stop = min(start + _ENCODE_ROWS, n)
            self._encode_block(typed, start, stop, out[start:stop])
        return out

    def _encode_block(
        self, typed: Sequence[NDArray[Any]], start: int, stop: int, out: NDArray[np.float32]
    ) -> None:
        col = 0
        for spec, values in zip(self.schema.features, typed, strict=True):
            part = values[start:stop]
            if spec.type == "categorical":
                k = len(spec.categories or ())
                codes = np.asarray(part, dtype=np.int64)
                block = out[:, col : col + k]
                block.fill(0.0)
                rows = np.flatnonzero(codes >= 0)
                block[rows, codes[rows]] = 1.0
                if spec.missing == "mean":
                    gone = codes < 0
                    block[gone] = np.nan
                    out[:, col + k] = gone
                col += k
            else:
                v = np.asarray(part, dtype=np.float64)
                out[:, col] = np.log1p(v) if spec.log1p else v
                if spec.missing == "mean":
                    out[:, col + 1] = np.isnan(v)
                col += 1
            if spec.missing == "mean":
                col += 1

    def encode_target(self, y: NDArray[Any]) -> NDArray[Any]:
        """Regression targets rescaled into [-1, 1] by the public range; classes as they are."""
        if not self.schema.is_regression:
            return np.asarray(y, dtype=np.int64)
        centre, radius = self.target_scale
        return ((np.asarray(y, dtype=np.float64) - centre) / radius).astype(np.float32)

    def decode_target(self, z: NDArray[Any]) -> NDArray[np.float64]:
        """Model outputs in target units, clipped to the public range."""
        centre, radius = self.target_scale
        return np.clip(
            centre + radius * np.asarray(z, dtype=np.float64), centre - radius, centre + radius
        )

    @property
    def target_scale(self) -> tuple[float, float]:
        target = self.schema.target
        if target is None:
            return 0.0, 1.0
        return (target.min + target.max) / 2.0, (target.max - target.min) / 2.0


_CACHE: dict[str, Encoding] = {}


def encoding_for(schema: DataSchema) -> Encoding:
    """The (cached) encoding of a schema: building one walks every feature."""
    key = schema.model_dump_json()
    found = _CACHE.get(key)
    if found is None:
        found = _CACHE[key] = Encoding(schema)
    return found
