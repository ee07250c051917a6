"""Thin HTTP front door for encrypted inference (FastAPI ``APIRouter``).

The gateway mounts this router (replacing :func:`caller_identity` with its
authenticated principal) and serves the same :class:`secure.he.service.HEService`
over gRPC as ``fedvault.EncryptedInferenceService``
(:mod:`server.gateway.grpc_extensions`); ``fedvault he serve`` runs it alone.

Endpoints (JSON; ciphertexts are standard base64 of TenSEAL's serialisation):

- ``GET  /v2/models/{model_id}/he``            parameters, keys, layouts, features, outputs,
  and for a model with a schema that schema and the DP imputation means, so a
  caller encodes raw rows itself (:mod:`secure.client`)
- ``POST /v2/models/{model_id}/he/contexts``   body: the raw bytes of
  ``context.serialize(save_secret_key=False)`` (``application/octet-stream``)
  → ``{"context_id", "expires_in_s", "layouts"}``
- ``DELETE /v2/he/contexts/{context_id}``
- ``POST /v2/models/{model_id}/he/infer``      ``{"context_id", "layout", "inputs": [b64]}``
  → ``{"model_id", "layout", "outputs": [b64]}``

Errors are RFC 9457 problem+json with the status of
:data:`fedvault.errors.ERROR_TABLE` and the stable ``urn:fedvault:problem:*``
type URIs, from :mod:`server.problem` — the handlers every fedvault app
installs (a router cannot carry its own), so the HE endpoints answer errors
exactly as the gateway does whether mounted there or served alone.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fedvault.errors import (
    AuthenticationError,
    ConfigError,
    PayloadTooLargeError,
)
from secure.he.service import HEModel, HEService, context_size_limit
from server.gateway.repository import raw_columns
from server.problem import install_problem_handlers, problem_responses
from server.registry import ModelRegistry
from server.store import FederationStore

IDENTITY_HEADER = "X-Fedvault-Caller"
MAX_INFER_BODY = 256 * 1024**2  # a full digits batch is ~20 MB of base64


def caller_identity(
    x_fedvault_caller: Annotated[str | None, Header(alias=IDENTITY_HEADER)] = None,
) -> str:
    """Who is calling: a stand-in until the gateway authenticates callers.

    The header is *asserted*, not proven: deploy this router only on loopback or
    behind the gateway, which overrides this dependency with its authenticated
    principal (``app.dependency_overrides[caller_identity] = ...``).
    """
    if not x_fedvault_caller or len(x_fedvault_caller) > 200:
        raise AuthenticationError(f"missing or invalid {IDENTITY_HEADER} header")
    return x_fedvault_caller


Caller = Annotated[str, Depends(caller_identity)]


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    context_id: str = Field(min_length=1, max_length=200)
    layout: str
    inputs: list[str] = Field(min_length=1, max_length=100_000)


def _b64(value: str, index: int) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"input {index} is not valid base64") from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused early (Content-Length) or while streaming past ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is {declared} bytes, the limit is {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# The bodies are read raw (size limits before parsing), so FastAPI cannot infer them.
_CONTEXT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "TenSEAL context.serialize(save_secret_key=False)",
            }
        },
    }
}
_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": InferRequest.model_json_schema()}},
    }
}


def build_router(service: HEService) -> APIRouter:
    router = APIRouter(tags=["homomorphic inference"])

    @router.get(
        "/v2/models/{model_id}/he",
        name="he_metadata",
        responses=problem_responses(401, 404, 422),
    )
    async def he_metadata(model_id: str, caller: Caller) -> dict[str, Any]:
        return await run_in_threadpool(service.metadata, model_id)

    @router.post(
        "/v2/models/{model_id}/he/contexts",
        status_code=201,
        name="he_register_context",
        responses=problem_responses(400, 401, 403, 404, 413, 422),
        openapi_extra=_CONTEXT_BODY,
    )
    async def register_context(model_id: str, request: Request, caller: Caller) -> dict[str, Any]:
        params = (await run_in_threadpool(service.model, model_id)).compiled.params
        body = await _read_body(request, context_size_limit(params))
        return await service.register_context_async(caller, model_id, body)

    @router.delete(
        "/v2/he/contexts/{context_id}",
        status_code=204,
        name="he_delete_context",
        responses=problem_responses(401, 403, 404, 410),
    )
    async def delete_context(context_id: str, caller: Caller) -> None:
        service.delete_context(caller, context_id)

    @router.post(
        "/v2/models/{model_id}/he/infer",
        name="he_infer",
        responses=problem_responses(400, 401, 403, 404, 410, 413, 422),
        openapi_extra=_INFER_BODY,
    )
    async def infer(model_id: str, request: Request, caller: Caller) -> dict[str, Any]:
        body = await _read_body(request, MAX_INFER_BODY)
        try:
            req = InferRequest.model_validate_json(body)
        except ValueError as exc:
            fields = sorted({".".join(map(str, e["loc"])) for e in getattr(exc, "errors", list)()})
            raise ConfigError(f"malformed infer request (fields: {', '.join(fields)})") from None
        inputs = [_b64(value, i) for i, value in enumerate(req.inputs)]
        outputs = await service.infer_async(caller, model_id, req.context_id, req.layout, inputs)
        return {
            "model_id": model_id,
            "layout": req.layout,
            "outputs": [base64.b64encode(o).decode() for o in outputs],
        }

    return router


def create_app(service: HEService) -> FastAPI:
    """A stand-alone app serving only the HE extension (``fedvault he serve``)."""
    app = FastAPI(title="fedvault encrypted inference", version="0.1.0")
    install_problem_handlers(app)
    app.include_router(build_router(service))
    return app


def registry_model_source(
    open_registry: Callable[[], tuple[FederationStore, ModelRegistry]],
) -> Callable[[str], HEModel]:
    """Load, verify and compile registry models for :class:`HEService`.

    A store is opened per load (and closed): loads are rare (the service caches
    compiled models) and happen on worker threads, which SQLite connections
    must not be shared across.
    """

    def load(model_id: str) -> HEModel:
        store, registry = open_registry()
        try:
            loaded = registry.load(model_id)  # NotFoundError / IntegrityError propagate
        finally:
            store.close()
        # The schema the gateway would serve the raw columns with (None when unknown
        # or not matching the model): its metadata lets callers encode raw rows.
        raw = raw_columns(model_id, loaded.spec, loaded.lineage)
        return HEModel.build(
            model_id,
            loaded.spec,
            loaded.params,
            loaded.scaler,
            None if raw is None else raw.schema,
        )

    return load
