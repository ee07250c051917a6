"""The gateway's model repository: registry versions, verified at load, one default each.

Why load everything at start-up: a model is served only after its Ed25519
signature verified and its AES-GCM envelope opened (``ModelRegistry.load``);
doing that once, up front, keeps the request path free of crypto and disk,
and a tampered artifact is refused — reported in the repository index, a
metric and a structured log line — before any caller can reach it.

OIP names: a model's *name* is the registry name (``digits-logreg``), its
*versions* the registry version numbers as strings. The default version is
the newest one that loaded, unless an admin rolled back: that choice is kept
in the gateway database so a restart keeps it.

Tensors (also the metadata the service returns). A model trained on a data
schema (stored in its lineage; the built-in tables' schemas for older models)
takes the schema's *raw columns* and the gateway encodes them as training did
(:mod:`fedvault.encoding`: ``log1p``, one-hot categories, missing values and
their indicators), then standardises with the model's DP scaler:

- inputs, one per schema feature, named after the column, shape ``[-1]``:
  FP32 for ``float``/``int`` features, BOOL for ``boolean`` ones, BYTES for
  ``categorical`` ones (any numeric datatype, or ``[-1, 1]``, is accepted too);
- when no feature is categorical, also the single input ``features`` FP32
  ``[-1, n_columns]``: the raw columns in schema order (NaN: missing). For a
  schema of plain ``float``/``int`` features that refuse missing values (the
  built-in breast-cancer and digits tables) the metadata advertises this
  matrix, as it always did, and the per-column inputs are accepted as well;
- a model without a known schema takes ``features`` FP32 ``[-1, n_features]``
  (its numeric input before standardisation), as before schemas existed.

Outputs: a classifier's ``logits`` FP32 ``[-1, n_classes]``, ``probabilities``
FP32 ``[-1, n_classes]`` (softmax), ``class`` INT64 ``[-1]`` (argmax); a
regression model's ``value`` FP32 ``[-1]``, the prediction in the target's
units (clipped to its public range).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedvault.encoding import Encoding, encoding_for
from fedvault.errors import (
    ConflictError,
    FedvaultError,
    NotFoundError,
    UnavailableError,
)
from fedvault.modelspec import FloatArray, ModelSpec, forward
from fedvault.schema import DataSchema, FeatureSpec, lineage_schema
from fedvault.stats import Scaler
from server.registry import ModelRegistry
from server.store import FederationStore

__all__ = [
    "INPUT_NAME",
    "OUTPUTS",
    "REGRESSION_OUTPUTS",
    "ModelRepository",
    "RawColumns",
    "ServedModel",
    "TensorSpec",
]

_log = logging.getLogger(__name__)

INPUT_NAME = "features"
OUTPUTS = ("logits", "probabilities", "class")
REGRESSION_OUTPUTS = ("value",)
PLATFORM = "fedvault_numpy"
_COLUMN_DATATYPE = {"float": "FP32", "int": "FP32", "boolean": "BOOL", "categorical": "BYTES"}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size (the batch)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class RawColumns:
    """A model's schema: its raw-column inputs and how they become the model's input.

    Precomputed once per loaded model; the service reads it on every request.
    """

    schema: DataSchema
    encoding: Encoding
    by_name: dict[str, FeatureSpec]
    tensors: tuple[TensorSpec, ...]  # one per feature, in schema order
    accepts_matrix: bool  # no categorical: ``features`` [-1, n_columns] is accepted
    advertises_matrix: bool  # plain numeric columns, refuse missing: metadata shows ``features``
    # The matrix *is* the model input (no log1p, boolean, imputation): a request
    # is then checked against the bounds in one vectorised pass.
    identity: bool
    lo: NDArray[np.float64]
    hi: NDArray[np.float64]
    integral: NDArray[np.intp]  # columns of ``int`` features

    @classmethod
    def of(cls, schema: DataSchema) -> RawColumns:
        features = schema.features
        plain = all(f.numeric and f.missing == "refuse" for f in features)
        accepts = schema.all_numeric and INPUT_NAME not in schema.feature_names
        return cls(
            schema=schema,
            encoding=encoding_for(schema),
            by_name={f.name: f for f in features},
            tensors=tuple(TensorSpec(f.name, _COLUMN_DATATYPE[f.type], (-1,)) for f in features),
            accepts_matrix=accepts,
            advertises_matrix=accepts and plain,
            identity=plain and not any(f.log1p for f in features),
            lo=np.array([f.min if f.min is not None else -np.inf for f in features]),
            hi=np.array([f.max if f.max is not None else np.inf for f in features]),
            integral=np.array([i for i, f in enumerate(features) if f.type == "int"], np.intp),
        )

    @property
    def matrix(self) -> TensorSpec:
        return TensorSpec(INPUT_NAME, "FP32", (-1, len(self.schema.features)))


def raw_columns(name: str, spec: ModelSpec, lineage: dict[str, Any]) -> RawColumns | None:
    """The model's schema inputs, or None (served on its numeric input, as before
    schemas travelled with models) when no schema is known or it does not fit."""
    try:
        schema = lineage_schema(lineage)
        if schema is None:
            return None
        raw = RawColumns.of(schema)
    except (FedvaultError, ValueError) as exc:  # a draft or unreadable stored schema
        reason = type(exc).__name__
    else:
        if raw.encoding.width == spec.n_features and schema.is_regression == spec.is_regression:
            return raw
        reason = "schema does not match the model's input or task"
    _log.warning(json.dumps({"event": "model_schema_ignored", "model": name, "reason": reason}))
    return None


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One verified, decrypted model version, ready for plaintext inference."""

    name: str
    version: str
    model_id: str
    spec: ModelSpec
    params: list[FloatArray]
    scaler: Scaler
    lineage: dict[str, Any]
    raw: RawColumns | None = None  # None: no known schema, served on ``features`` only
    # Precomputed for the request path: float32 scaler and transposed weights.
    _mean: NDArray[np.float32] = field(repr=False, default_factory=lambda: np.zeros(0, np.float32))
    _inv_std: NDArray[np.float32] = field(
        repr=False, default_factory=lambda: np.zeros(0, np.float32)
    )

    @classmethod
    def build(
        cls,
        name: str,
        version: str,
        model_id: str,
        spec: ModelSpec,
        params: list[FloatArray],
        scaler: Scaler,
        lineage: dict[str, Any],
    ) -> ServedModel:
        return cls(
            name,
            version,
            model_id,
            spec,
            params,
            scaler,
            lineage,
            raw_columns(name, spec, lineage),
            np.asarray(scaler.mean, np.float32),
            np.asarray(1.0 / scaler.std, np.float32),
        )

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The inputs the metadata advertises (see the module docstring)."""
        if self.raw is None:
            return (TensorSpec(INPUT_NAME, "FP32", (-1, self.spec.n_features)),)
        if self.raw.advertises_matrix:
            return (self.raw.matrix,)
        return self.raw.tensors

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        if self.spec.is_regression:
            return tuple(TensorSpec(n, "FP32", (-1,)) for n in REGRESSION_OUTPUTS)
        k = self.spec.n_classes
        return (
            TensorSpec("logits", "FP32", (-1, k)),
            TensorSpec("probabilities", "FP32", (-1, k)),
            TensorSpec("class", "INT64", (-1,)),
        )

    @property
    def partners(self) -> frozenset[str]:
        return frozenset(self.lineage.get("partners", ()))

    def standardise(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Standardised inputs; a missing (NaN) entry becomes 0, the federation's DP
        mean (the ``mean`` imputation, as :meth:`fedvault.stats.Scaler.apply`)."""
        z = (x - self._mean) * self._inv_std
        if self.raw is not None and self.raw.encoding.has_missing:  # else no NaN gets here
            missing = np.isnan(z)
            if missing.any():
                z[missing] = 0.0
        return z

    def predict(self, z: NDArray[np.float32], wanted: tuple[str, ...]) -> dict[str, NDArray[Any]]:
        """Outputs ``wanted`` for standardised rows ``z`` (the registry's own forward pass)."""
        logits = forward(self.spec, self.params, z)
        out: dict[str, NDArray[Any]] = {}
        if self.spec.is_regression:
            if "value" in wanted:
                value: NDArray[Any] = logits[:, 0]
                if self.raw is not None:  # the target rescaled into [-1, 1] → its units
                    value = self.raw.encoding.decode_target(value)
                out["value"] = value.astype(np.float32)
            return out
        if "logits" in wanted:
            out["logits"] = logits
        if "probabilities" in wanted:
            shifted = logits - logits.max(axis=1, keepdims=True)
            e = np.exp(shifted)
            out["probabilities"] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        if "class" in wanted:
            out["class"] = logits.argmax(axis=1).astype(np.int64)
        return out


@dataclass(frozen=True, slots=True)
class LoadFailure:
    name: str
    version: str
    model_id: str
    error_type: str
    reason: str


DefaultsStore = Any  # GatewayStore; Any avoids an import cycle in type-only use


class ModelRepository:
    """Every registry version the gateway may serve, and which one is the default."""

    def __init__(
        self,
        open_registry: Callable[[], tuple[FederationStore, ModelRegistry]],
        defaults: DefaultsStore,
        *,
        on_load_failure: Callable[[LoadFailure], None] | None = None,
    ) -> None:
        self._open_registry = open_registry
        self._defaults = defaults
        self._on_failure = on_load_failure or (lambda _f: None)
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, ServedModel]] = {}
        self._failures: dict[str, dict[str, LoadFailure]] = {}
        self._by_id: dict[str, ServedModel] = {}

    # ----------------------------------------------------------------- loading
    def load_all(self) -> list[LoadFailure]:
        """(Re)load every registered version; refused ones are reported, not served."""
        store, registry = self._open_registry()
        try:
            rows = store.models()
            models: dict[str, dict[str, ServedModel]] = {}
            failures: dict[str, dict[str, LoadFailure]] = {}
            for row in rows:
                name, version, model_id = row["name"], str(row["version"]), row["model_id"]
                try:
                    loaded = registry.load(model_id)
                except FedvaultError as exc:  # IntegrityError: tampered or missing artifact
                    failure = LoadFailure(name, version, model_id, type(exc).__name__, str(exc))
                    failures.setdefault(name, {})[version] = failure
                    _log.error(
                        json.dumps(
                            {
                                "event": "model_load_refused",
                                "model": name,
                                "version": version,
                                "model_id": model_id,
                                "error": type(exc).__name__,
                            }
                        )
                    )
                    self._on_failure(failure)
                    continue
                served = ServedModel.build(
                    name,
                    version,
                    model_id,
                    loaded.spec,
                    loaded.params,
                    loaded.scaler,
                    loaded.lineage,
                )
                models.setdefault(name, {})[version] = served
        finally:
            store.close()
        with self._lock:
            self._models = models
            self._failures = failures
            self._by_id = {m.model_id: m for vs in models.values() for m in vs.values()}
        return [f for vs in failures.values() for f in vs.values()]

    # ------------------------------------------------------------------ lookups
    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self._models) | set(self._failures))

    def versions(self, name: str) -> list[str]:
        """Versions that loaded (servable), oldest first."""
        with self._lock:
            loaded = self._models.get(name)
            if loaded is None and name not in self._failures:
                raise NotFoundError(f"no model named {name[:128]!r}")
            return sorted(loaded or {}, key=int)

    def default_version(self, name: str) -> str:
        versions = self.versions(name)
        if not versions:
            raise UnavailableError(f"no version of model {name!r} passed verification at load")
        chosen = self._defaults.default_version(name)
        return chosen if chosen in versions else versions[-1]

    def resolve(self, name: str, version: str | None) -> ServedModel:
        """The served model for ``name`` at ``version`` (default if None or empty)."""
        version = version or self.default_version(name)
        with self._lock:
            by_version = self._models.get(name)
            if by_version is not None and version in by_version:
                return by_version[version]
            if version in self._failures.get(name, {}):
                raise UnavailableError(
                    f"model {name!r} version {version} was refused at load (integrity check)"
                )
            if by_version is None and name not in self._failures:
                raise NotFoundError(f"no model named {name[:128]!r}")
        raise NotFoundError(f"model {name!r} has no version {version[:32]!r}")

    def by_model_id(self, model_id: str) -> ServedModel:
        with self._lock:
            found = self._by_id.get(model_id)
        if found is None:
            raise NotFoundError(f"no loaded model with id {model_id[:128]!r}")
        return found

    def by_reference(self, ref: str) -> ServedModel:
        """A model id, or a name at its default version *now*.

        Encrypted inference addresses models this way; resolving a name on
        every call (not once, at first use) makes it follow rollbacks and new
        versions as plaintext inference does.
        """
        try:
            return self.by_model_id(ref)
        except NotFoundError:
            return self.resolve(ref, None)

    def is_ready(self, name: str, version: str | None) -> bool:
        try:
            self.resolve(name, version)
        except FedvaultError:
            return False
        return True

    def all_served(self) -> list[ServedModel]:
        with self._lock:
            return [m for vs in self._models.values() for m in vs.values()]

    # -------------------------------------------------------------------- admin
    def rollback(self, name: str, version: str | None, *, actor: str) -> str:
        """Make ``version`` (default: the loaded one before the current default) the default."""
        versions = self.versions(name)
        current = self.default_version(name)
        if version is None:
            older = [v for v in versions if int(v) < int(current)]
            if not older:
                raise ConflictError(f"model {name!r} has no loaded version before {current}")
            version = older[-1]
        if version not in versions:
            raise ConflictError(
                f"model {name!r} version {version[:32]!r} is not loaded; cannot make it the default"
            )
        self._defaults.set_default_version(name, version, actor=actor)
        return version

    def index(self) -> list[dict[str, Any]]:
        """Repository index: every version with its state (READY or UNAVAILABLE and why)."""
        out: list[dict[str, Any]] = []
        for name in self.names():
            with self._lock:
                loaded = dict(self._models.get(name, {}))
                failed = dict(self._failures.get(name, {}))
            default = self.default_version(name) if loaded else None
            for version in sorted(set(loaded) | set(failed), key=int):
                entry: dict[str, Any] = {"name": name, "version": version}
                if version in loaded:
                    entry["state"] = "READY"
                    entry["model_id"] = loaded[version].model_id
                    entry["default"] = version == default
                else:
                    entry["state"] = "UNAVAILABLE"
                    entry["model_id"] = failed[version].model_id
                    entry["reason"] = failed[version].error_type
                    entry["default"] = False
                out.append(entry)
        return out
