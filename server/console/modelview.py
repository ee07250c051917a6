"""A registered model's data schema and held-out metrics, as the models page shows them.

Both come from the model's lineage (the registry row the coordinator wrote):

- the schema in raw columns, as the operator declared it — task, label with
  its classes or the regression target's public range, each feature's type,
  public bounds and where they came from (domain knowledge, the federation's
  DP quantile release, or a draft placeholder), ``log1p``, categories and
  ``other``, missing and out-of-range policies, ignored columns — and its
  SHA-256. Models registered before schemas travelled with them fall back to
  the built-in table their lineage names (:func:`fedvault.schema.lineage_schema`);
  the page says which it is, and when the recorded hash no longer matches.
  Everything in a schema is public by construction (see :mod:`fedvault.schema`),
  so every role that sees the model sees its schema.
- the metrics of the model's task (:func:`fedvault.metrics.summarise`): R²,
  RMSE and MAE for regression; accuracy, balanced accuracy, ROC AUC and log
  loss for classification, final and per round. The one-line summary uses the
  same metrics as ``fedvault models list`` (accuracy and ROC AUC, or R²).

Pure: lineage dicts in, display strings out; the template escapes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from fedvault.errors import FedvaultError
from fedvault.metrics import headline
from fedvault.schema import DataSchema, FeatureSpec, lineage_schema, schema_hash

__all__ = [
    "FeatureRow",
    "MetricsView",
    "SchemaView",
    "metrics_view",
    "schema_view",
]

# Categories listed per feature before the rest are counted (a schema allows 1000).
MAX_CATEGORIES_SHOWN: Final = 50

_BOUNDS_SOURCE: Final = {
    "domain": "domain knowledge",
    "dp": "DP quantiles",
    "placeholder": "placeholder (draft)",
}
_TASKS: Final = {
    "binary": "binary classification",
    "multiclass": "multiclass classification",
    "classification": "classification",
    "regression": "regression",
}
_REGRESSION: Final = (
    ("r2", "R²"),
    ("rmse", "RMSE"),
    ("mae", "MAE"),
    ("eval_loss", "loss (rescaled target)"),
)
_CLASSIFICATION: Final = (
    ("eval_accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("roc_auc", "ROC AUC"),
    ("eval_loss", "log loss"),
)
_NOT_METRICS: Final = frozenset({"round", "evaluated_round", "partners", "failed", "epsilon"})


def _num(value: float) -> str:
    """A bound as written in a schema file: 5000, 0.5, 1e-06."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


@dataclass(frozen=True, slots=True)
class FeatureRow:
    name: str
    type: str
    bounds: str  # "[0, 50]", or "—" where the type has none
    bounds_source: str  # domain knowledge / DP quantiles / placeholder (draft)
    log1p: bool
    categories: tuple[str, ...]
    more_categories: int  # declared but not listed (past MAX_CATEGORIES_SHOWN)
    other: str | None
    missing: str
    out_of_range: str


@dataclass(frozen=True, slots=True)
class SchemaView:
    name: str
    description: str
    task: str
    label: str
    classes: tuple[str, ...]
    target: str | None  # a regression target's public range, its source and policy
    features: list[FeatureRow]
    ignore: tuple[str, ...]
    missing_values: tuple[str, ...]
    schema_hash: str
    source: str  # where the schema was read from
    warning: str | None  # the recorded hash disagrees with the schema shown


def _bounds(feature: FeatureSpec) -> str:
    if not feature.numeric:
        return "—"
    if feature.min is None or feature.max is None:
        return "not set"
    return f"[{_num(feature.min)}, {_num(feature.max)}]"


def _missing(feature: FeatureSpec) -> str:
    if feature.missing == "constant":
        fill = feature.fill
        if isinstance(fill, bool):
            shown = "true" if fill else "false"
        elif isinstance(fill, int | float):
            shown = _num(float(fill))
        else:
            shown = str(fill)
        return f"constant (fill {shown})"
    if feature.missing == "mean":
        return "DP mean + missing indicator"
    return "refuse"


def _feature_row(feature: FeatureSpec) -> FeatureRow:
    categories = feature.categories or ()
    source = _BOUNDS_SOURCE[feature.bounds]
    if not feature.numeric and feature.bounds == "domain":
        source = "—" if feature.type == "boolean" else "domain knowledge (categories)"
    return FeatureRow(
        name=feature.name,
        type=feature.type,
        bounds=_bounds(feature),
        bounds_source=source,
        log1p=feature.log1p,
        categories=categories[:MAX_CATEGORIES_SHOWN],
        more_categories=max(0, len(categories) - MAX_CATEGORIES_SHOWN),
        other=feature.other,
        missing=_missing(feature),
        out_of_range=feature.out_of_range if feature.numeric else "—",
    )


def _view(schema: DataSchema, recorded: str | None, stored: bool, dataset: str) -> SchemaView:
    computed = schema_hash(schema)
    warning = None
    if stored:
        source = "recorded with the model"
        if recorded is not None and recorded != computed:
            warning = (
                f"the lineage's schema_hash {recorded} does not match the schema stored "
                f"with it (SHA-256 {computed})"
            )
    else:
        source = f"the built-in {dataset!r} schema: this model's lineage predates stored schemas"
        if recorded is not None and recorded != computed:
            warning = (
                f"the model was trained on a different version of the built-in schema "
                f"(recorded schema_hash {recorded}); the current one is shown"
            )
    target = None
    if schema.target is not None:
        t = schema.target
        target = (
            f"[{_num(t.min)}, {_num(t.max)}] ({_BOUNDS_SOURCE[t.bounds]}), "
            f"out of range: {t.out_of_range}"
        )
    return SchemaView(
        name=schema.name,
        description=schema.description,
        task=_TASKS[schema.task],
        label=schema.label,
        classes=schema.classes,
        target=target,
        features=[_feature_row(f) for f in schema.features],
        ignore=schema.ignore,
        missing_values=schema.missing_values,
        schema_hash=recorded if recorded is not None and warning is None else computed,
        source=source,
        warning=warning,
    )


def schema_view(lineage: dict[str, Any]) -> tuple[SchemaView | None, str | None]:
    """The schema a model was trained on, or None and why it cannot be shown."""
    try:
        schema = lineage_schema(lineage)
    except FedvaultError as exc:
        return None, f"The schema stored with this model cannot be read: {exc}"
    if schema is None:
        return None, "No schema is recorded for this model (registered before schemas were)."
    recorded = lineage.get("schema_hash")
    return (
        _view(
            schema,
            recorded if isinstance(recorded, str) else None,
            isinstance(lineage.get("schema"), dict),
            str(lineage.get("dataset", "")),
        ),
        None,
    )


@dataclass(frozen=True, slots=True)
class MetricsView:
    task: str  # as _TASKS words
    summary: str  # one line, as `fedvault models list`
    final: list[tuple[str, str]]  # (label, value) in the task's order
    columns: list[str]  # per-round table: metric labels
    rounds: list[tuple[int, list[str]]]  # (evaluated round, values in column order)


def _fmt(value: Any) -> str | None:
    """A metric value for display; None for what is not a metric value."""
    if value is None:
        return "—"  # undefined (e.g. R² of a constant target, no test rows)
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return str(value)
    return None


def _task(lineage: dict[str, Any], schema: SchemaView | None, final: dict[str, Any]) -> str:
    if schema is not None:
        return schema.task
    task = lineage.get("task")
    if isinstance(task, str) and task in _TASKS:
        return _TASKS[task]
    return "regression" if "r2" in final or "rmse" in final else "classification"


def metrics_view(lineage: dict[str, Any], schema: SchemaView | None) -> MetricsView:
    """The task's held-out metrics from a lineage: final, per round, and a one-line summary."""
    recorded = lineage.get("metrics")
    recorded = recorded if isinstance(recorded, dict) else {}
    final = recorded.get("final")
    final = final if isinstance(final, dict) else {}
    task = _task(lineage, schema, final)
    labels: dict[str, str] = dict(_REGRESSION if task == "regression" else _CLASSIFICATION)
    if task == "multiclass classification":
        labels["roc_auc"] = "ROC AUC (mean one-vs-rest)"
    ordered: list[str] = [*labels, *sorted(str(k) for k in final if k not in labels)]

    shown: list[tuple[str, str]] = []
    for key in ordered:
        value = _fmt(final[key]) if key in final and key not in _NOT_METRICS else None
        if value is not None:
            shown.append((labels.get(key, key), value))
    if isinstance(final.get("evaluated_round"), int):
        shown.append(("evaluated round", str(final["evaluated_round"])))

    by_round: dict[int, dict[str, Any]] = {}
    history = recorded.get("rounds")
    for entry in [*(history if isinstance(history, list) else []), final]:
        if isinstance(entry, dict) and isinstance(entry.get("evaluated_round"), int):
            if entry["evaluated_round"] > 0:  # round 0: the untrained initial model
                by_round[entry["evaluated_round"]] = entry  # the final evaluation wins
    keys = [k for k in labels if any(k in m for m in by_round.values())]
    rounds = (
        [(r, [_fmt(by_round[r].get(k)) or "—" for k in keys]) for r in sorted(by_round)]
        if keys
        else []
    )
    summary = headline(final)
    return MetricsView(task, summary, shown, [labels[k] for k in keys], rounds)
