"""The gateway's transport-independent core: what REST and gRPC both call.

Authentication and audit wrap this layer (they differ per transport only in
where the key and the bytes come from); authorisation, model lookup, tensor
validation against metadata and inference happen here once. Every check
raises a :class:`~fedvault.errors.FedvaultError`, which each front door maps
through the one error table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedvault.errors import FedvaultError, InvalidRequestError, NotFoundError
from server.gateway.auth import Action, Principal, authorize
from server.gateway.metrics import GatewayMetrics
from server.gateway.repository import PLATFORM, ModelRepository, ServedModel
from server.gateway.tensors import InferRequest, InferResponse, Tensor

__all__ = ["EXTENSIONS", "SERVER_NAME", "InferenceService", "ModelMetadata"]

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
        (spec,) = model.inputs
        names = [t.name for t in request.inputs]
        if names != [spec.name]:
            raise InvalidRequestError(
                f"model {model.name!r} takes exactly one input {spec.name!r}, got "
                f"{[n[:64] for n in names][:8]}"
            )
        (tensor,) = request.inputs
        if tensor.datatype != spec.datatype:
            raise InvalidRequestError(
                f"input {spec.name!r} must be {spec.datatype}, got {tensor.datatype[:16]}"
            )
        if len(tensor.shape) != len(spec.shape) or tensor.shape[1] != spec.shape[1]:
            raise InvalidRequestError(
                f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(tensor.shape)}"
            )
        x = tensor.data
        if not np.isfinite(x).all():
            raise InvalidRequestError(f"input {spec.name!r} contains NaN or infinity")
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
