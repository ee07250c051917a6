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

Tensors (also the metadata the service returns):

- input ``features`` FP32 ``[-1, n_features]``: raw features in the schema's
  units; the model's scaler standardises them;
- output ``logits`` FP32 ``[-1, n_classes]``, ``probabilities`` FP32
  ``[-1, n_classes]`` (softmax), ``class`` INT64 ``[-1]`` (argmax).
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

from fedvault.errors import (
    ConflictError,
    FedvaultError,
    NotFoundError,
    UnavailableError,
)
from fedvault.modelspec import FloatArray, ModelSpec, forward
from fedvault.stats import Scaler
from server.registry import ModelRegistry
from server.store import FederationStore

__all__ = [
    "INPUT_NAME",
    "OUTPUTS",
    "ModelRepository",
    "ServedModel",
    "TensorSpec",
]

_log = logging.getLogger(__name__)

INPUT_NAME = "features"
OUTPUTS = ("logits", "probabilities", "class")
PLATFORM = "fedvault_numpy"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size (the batch)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


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
            np.asarray(scaler.mean, np.float32),
            np.asarray(1.0 / scaler.std, np.float32),
        )

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(INPUT_NAME, "FP32", (-1, self.spec.n_features)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
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
        return (x - self._mean) * self._inv_std

    def predict(self, z: NDArray[np.float32], wanted: tuple[str, ...]) -> dict[str, NDArray[Any]]:
        """Outputs ``wanted`` for standardised rows ``z`` (the registry's own forward pass)."""
        logits = forward(self.spec, self.params, z)
        out: dict[str, NDArray[Any]] = {}
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
