"""The gateway's transport-independent core: what REST and gRPC both call.

Authentication and audit wrap this layer (they differ per transport only in
where the key and the bytes come from); authorisation, model lookup, tensor
validation against metadata and inference happen here once. Every check
raises a :class:`~fedvault.errors.FedvaultError`, which each front door maps
through the one error table.

Raw columns (see :mod:`server.gateway.repository`): a model with a schema
checks each column's values as a partner's node checks its file
(:func:`fedvault.encoding.typed_values`: bounds, categories, missing-value
policy), encodes them as training did and standardises; a missing value the
schema imputes becomes the federation's DP mean. A bad value is a 400 naming
the input, the row (1-based) and the problem — and that row's value only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedvault.encoding import InvalidValue, typed_values
from fedvault.errors import FedvaultError, InvalidRequestError, NotFoundError
from fedvault.schema import FeatureSpec
from server.gateway.auth import Action, Principal, authorize
from server.gateway.metrics import GatewayMetrics
from server.gateway.repository import (
    INPUT_NAME,
    PLATFORM,
    ModelRepository,
    RawColumns,
    ServedModel,
    TensorSpec,
)
from server.gateway.tensors import BYTES, DATATYPES, InferRequest, InferResponse, Tensor

__all__ = ["EXTENSIONS", "SERVER_NAME", "InferenceService", "ModelMetadata", "model_input"]

SERVER_NAME = "fedvault"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data", "model_repository", "fedvault_he", "fedvault_audit")


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": self.versions,
            "platform": self.platform,
            "inputs": self.inputs,
            "outputs": self.outputs,
        }


class InferenceService:
    """Health, metadata and plaintext inference over the model repository."""

    def __init__(
        self,
        repository: ModelRepository,
        metrics: GatewayMetrics,
        *,
        audit_healthy: Callable[[], bool] = lambda: True,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self._audit_healthy = audit_healthy

    # ------------------------------------------------------------------ health
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready when the audit log accepts appends (fail closed) and a model is servable."""
        ok = self._audit_healthy() and bool(self.repository.all_served())
        self.metrics.ready.set(1.0 if ok else 0.0)
        return ok

    def server_metadata(self, principal: Principal) -> dict[str, Any]:
        authorize(principal, Action.SERVER_METADATA)
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}

    # ------------------------------------------------------------------ models
    def model_partners(self, name: str) -> frozenset[str]:
        partners: set[str] = set()
        for version in self.repository.versions(name):
            partners |= self.repository.resolve(name, version).partners
        return frozenset(partners)

    def authorize_model(self, principal: Principal, action: Action, name: str) -> None:
        """Role and per-model grant check; front doors call it before reading a body."""
        authorize(principal, action, model=name, model_partners=self.model_partners)

    def model_metadata(
        self, principal: Principal, name: str, version: str | None
    ) -> tuple[ServedModel, ModelMetadata]:
        self.authorize_model(principal, Action.MODEL_METADATA, name)
        model = self.repository.resolve(name, version)
        versions = [version] if version else self.repository.versions(name)
        return model, ModelMetadata(
            name=name,
            versions=versions,
            platform=PLATFORM,
            inputs=[t.as_dict() for t in model.inputs],
            outputs=[t.as_dict() for t in model.outputs],
        )

    def model_ready(self, principal: Principal, name: str, version: str | None) -> bool:
        self.authorize_model(principal, Action.MODEL_READY, name)
        try:
            self.repository.versions(name)
        except NotFoundError:
            raise
        return self.repository.is_ready(name, version)

    # ------------------------------------------------------------------- infer
    def infer(self, principal: Principal, request: InferRequest) -> InferResponse:
        """Validate against the model's metadata, standardise, forward, shape the outputs."""
        self.authorize_model(principal, Action.INFER, request.model_name)
        model = self.repository.resolve(request.model_name, request.model_version)
        return self.infer_model(model, request)

    def infer_model(self, model: ServedModel, request: InferRequest) -> InferResponse:
        x = model_input(model, request.inputs)
        declared = {t.name: t for t in model.outputs}
        if request.outputs is None:
            wanted = tuple(declared)
        else:
            unknown = [o.name for o in request.outputs if o.name not in declared]
            if unknown:
                raise InvalidRequestError(
                    f"model {model.name!r} has no output(s) {[u[:64] for u in unknown][:8]}; "
                    f"outputs are {list(declared)}"
                )
            wanted = tuple(dict.fromkeys(o.name for o in request.outputs))
        z = model.standardise(x)
        try:
            results = model.predict(z, wanted)
        except (ValueError, FloatingPointError):
            raise FedvaultError("inference failed") from None
        self.metrics.window(model).add(z)
        outputs = [
            Tensor(name, declared[name].datatype, results[name].shape, results[name])
            for name in wanted
        ]
        return InferResponse(model.name, model.version, outputs, request.id)


# ------------------------------------------------------------------ model input
_NUMERIC = tuple(d for d in DATATYPES if d != "BOOL")


def model_input(model: ServedModel, inputs: Sequence[Tensor]) -> NDArray[np.float32]:
    """The model's numeric input (before standardisation; NaN where imputed) for
    the request's tensors, checked against the model's inputs and schema."""
    raw = model.raw
    if raw is None:
        return _numeric_input(model, inputs)
    if raw.accepts_matrix and [t.name for t in inputs] == [INPUT_NAME]:
        return _from_matrix(raw, inputs[0])
    return _from_columns(model, raw, inputs)


def _check_matrix(spec: TensorSpec, tensor: Tensor) -> None:
    if tensor.datatype != spec.datatype:
        raise InvalidRequestError(
            f"input {spec.name!r} must be {spec.datatype}, got {tensor.datatype[:16]}"
        )
    if len(tensor.shape) != len(spec.shape) or tensor.shape[1] != spec.shape[1]:
        raise InvalidRequestError(
            f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(tensor.shape)}"
        )


def _numeric_input(model: ServedModel, inputs: Sequence[Tensor]) -> NDArray[np.float32]:
    """A model without a known schema: ``features``, its numeric input as is."""
    (spec,) = model.inputs
    names = [t.name for t in inputs]
    if names != [spec.name]:
        raise InvalidRequestError(
            f"model {model.name!r} takes exactly one input {spec.name!r}, got "
            f"{[n[:64] for n in names][:8]}"
        )
    (tensor,) = inputs
    _check_matrix(spec, tensor)
    x: NDArray[np.float32] = tensor.data
    if not np.isfinite(x).all():
        raise InvalidRequestError(f"input {spec.name!r} contains NaN or infinity")
    return x


def _typed(
    spec: FeatureSpec, values: NDArray[Any], where: str, markers: frozenset[str]
) -> NDArray[Any]:
    try:
        return typed_values(spec, values, markers)
    except InvalidValue as exc:
        raise InvalidRequestError(f"{where}, row {exc.row + 1}: {exc.message}") from None


def _from_matrix(raw: RawColumns, tensor: Tensor) -> NDArray[np.float32]:
    """``features`` [-1, n_columns]: the raw columns in schema order, NaN missing."""
    _check_matrix(raw.matrix, tensor)
    x: NDArray[np.float32] = tensor.data
    if raw.identity:  # the usual case, in one pass; the column walk below names a bad value
        with np.errstate(invalid="ignore"):
            # Bounds as float32 (the input's type): a bound sent as FP32 is inside.
            ok = bool(
                (x >= raw.lo.astype(np.float32)).all() and (x <= raw.hi.astype(np.float32)).all()
            )
            if ok and raw.integral.size:
                ints = x[:, raw.integral]
                ok = bool((ints == np.floor(ints)).all())
        if ok:
            return x
    typed = [
        _typed(
            spec,
            x[:, j],
            f"input {INPUT_NAME!r}, column {j + 1} ({spec.name!r})",
            frozenset(raw.schema.missing_values),
        )
        for j, spec in enumerate(raw.schema.features)
    ]
    return raw.encoding.encode(typed)


def _shown(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n[:64]) for n in names[:8])
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _from_columns(
    model: ServedModel, raw: RawColumns, inputs: Sequence[Tensor]
) -> NDArray[np.float32]:
    """One input per schema column, any order, all with the same batch size."""
    counts = Counter(t.name for t in inputs)
    columns = raw.schema.feature_names
    missing = [c for c in columns if c not in counts]
    extra = [n for n in counts if n not in raw.by_name]
    twice = [n for n, c in counts.items() if c > 1]
    if missing or extra or twice:
        problems = [
            f"{what} {_shown(names)}"
            for what, names in (("missing", missing), ("unknown", extra), ("repeated", twice))
            if names
        ]
        alternative = (
            f", or the single input {INPUT_NAME!r} {list(raw.matrix.shape)}"
            if raw.accepts_matrix
            else ""
        )
        raise InvalidRequestError(
            f"model {model.name!r} takes one input per column of its schema "
            f"({len(columns)} columns{alternative}): input(s) " + "; ".join(problems)
        )
    by_name = {t.name: t for t in inputs}
    rows: int | None = None
    typed: list[NDArray[Any]] = []
    for spec in raw.schema.features:
        tensor = by_name[spec.name]
        shape = tensor.shape
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise InvalidRequestError(
                f"input {spec.name!r} must have shape [-1] (or [-1, 1]), got {list(shape)}"
            )
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise InvalidRequestError(
                f"input {spec.name!r} has {shape[0]} rows, input {columns[0]!r} has {rows}: "
                "every input needs the same batch size"
            )
        values = tensor.data.reshape(shape[0])
        datatype = tensor.datatype
        if spec.type == "categorical":
            if datatype != BYTES:
                raise InvalidRequestError(
                    f"input {spec.name!r} is categorical: it must be BYTES, got {datatype[:16]}"
                )
            values = _texts(spec.name, values)
        elif datatype == BYTES or (datatype == "BOOL" and spec.type != "boolean"):
            accepted = "BOOL or a numeric datatype" if spec.type == "boolean" else "numeric"
            raise InvalidRequestError(
                f"input {spec.name!r} must be {accepted} (such as FP32, FP64, INT32, INT64), "
                f"got {datatype[:16]}"
            )
        typed.append(
            _typed(spec, values, f"input {spec.name!r}", frozenset(raw.schema.missing_values))
        )
    return raw.encoding.encode(typed)


def _texts(name: str, values: NDArray[Any]) -> NDArray[np.object_]:
    """BYTES elements as text; bytes that are not UTF-8 are a 400 naming the row."""
    out = np.empty(len(values), dtype=np.object_)
    for i, value in enumerate(values.tolist()):
        try:
            out[i] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(
                f"input {name!r}, row {i + 1}: not valid UTF-8 text"
            ) from None
    return out
