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

``{model_id}`` is a registry model id or, on both servers, a model name: the
gateway serves its default version, the stand-alone app (:func:`create_app`)
the newest registered one (:class:`RegistryCatalog`; it has no admin default).
The stand-alone app also answers what the gateway answers around these routes,
with the same shapes, so a client or a probe works against either:
``GET /v2/health/live``, ``GET /v2/health/ready`` and
``POST /v2/repository/index`` (every registered version, ``READY`` when it can
be served under HE, else ``UNAVAILABLE`` and why).

Errors are RFC 9457 problem+json with the status of
:data:`fedvault.errors.ERROR_TABLE` and the stable ``urn:fedvault:problem:*``
type URIs, from :mod:`server.problem` — the handlers every fedvault app
installs (a router cannot carry its own), so the HE endpoints answer errors
exactly as the gateway does whether mounted there or served alone.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from fedvault.errors import (
    AuthenticationError,
    FedvaultError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
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
        raise InvalidRequestError(f"input {index} is not valid base64") from None


_INFER_SHAPE = '{"context_id": str, "layout": "vector" | "batch", "inputs": [base64, ...]}'
_LISTED_PROBLEMS = 5  # a 100,000-input body can fail 100,000 ways; name the first few


def parse_infer_request(body: bytes) -> InferRequest:
    """The infer body, or an InvalidRequestError saying what is wrong with it.

    Why not pydantic's message: it cannot tell "not JSON at all" from "JSON of
    the wrong shape", and for the former it lists no field (callers were told
    "malformed infer request (fields: )"). Field names come from the caller's
    JSON and are shortened; values are never echoed (they are ciphertexts).
    """
    try:
        return InferRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        reason = next(e["msg"] for e in errors if e["type"] == "json_invalid")
        raise InvalidRequestError(
            f"infer request body is not JSON ({reason}); expected {_INFER_SHAPE}"
        ) from None
    problems = [
        f"{'.'.join(str(p)[:64] for p in e['loc']) or 'body'}: {e['msg']}"
        for e in errors[:_LISTED_PROBLEMS]
    ]
    more = f" (and {len(errors) - _LISTED_PROBLEMS} more)" if len(errors) > _LISTED_PROBLEMS else ""
    raise InvalidRequestError(
        f"infer request is JSON but not an infer request: {'; '.join(problems)}{more}; "
        f"expected {_INFER_SHAPE}"
    ) from None


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


def build_router(service: HEService, resolve: Callable[[str], str] | None = None) -> APIRouter:
    """The HE routes over ``service``.

    ``resolve``: maps the path's model reference (an id or a name) to the
    registry model id the service is asked about; it runs on a worker thread
    (it may read the registry). None (the gateway) passes the reference on:
    the gateway's model source resolves names against its own repository.
    """
    router = APIRouter(tags=["homomorphic inference"])

    async def model_ref(ref: str) -> str:
        return ref if resolve is None else await run_in_threadpool(resolve, ref)

    @router.get(
        "/v2/models/{model_id}/he",
        name="he_metadata",
        responses=problem_responses(401, 404, 422),
    )
    async def he_metadata(model_id: str, caller: Caller) -> dict[str, Any]:
        return await run_in_threadpool(service.metadata, await model_ref(model_id))

    @router.post(
        "/v2/models/{model_id}/he/contexts",
        status_code=201,
        name="he_register_context",
        responses=problem_responses(400, 401, 403, 404, 413, 422),
        openapi_extra=_CONTEXT_BODY,
    )
    async def register_context(model_id: str, request: Request, caller: Caller) -> dict[str, Any]:
        model_id = await model_ref(model_id)
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
        model_id = await model_ref(model_id)
        body = await _read_body(request, MAX_INFER_BODY)
        req = parse_infer_request(body)
        inputs = [_b64(value, i) for i, value in enumerate(req.inputs)]
        outputs = await service.infer_async(caller, model_id, req.context_id, req.layout, inputs)
        return {
            "model_id": model_id,
            "layout": req.layout,
            "outputs": [base64.b64encode(o).decode() for o in outputs],
        }

    return router


OpenRegistry = Callable[[], tuple[FederationStore, ModelRegistry]]


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """One registered model version, as the registry index lists it."""

    name: str
    version: int
    model_id: str


class RegistryCatalog:
    """The registry's names and versions, for the stand-alone server.

    Why: the gateway resolves names and lists versions through its
    :class:`~server.gateway.repository.ModelRepository`, which loads and
    verifies every model at start-up; ``he serve`` loads a model only when it
    is first asked for, so it reads the registry *index* (names, versions,
    ids; no artifact) instead. The index is cached for ``ttl_s`` so a busy
    server does not open the store per request: a newly registered version is
    served by name within that time. A name means its newest registered
    version: there is no admin default here, and a newest version that fails
    to load answers its error rather than quietly falling back to an older one.
    """

    def __init__(
        self,
        open_registry: OpenRegistry,
        *,
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open = open_registry
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, tuple[RegistryEntry, ...]] | None = None

    def entries(self) -> tuple[RegistryEntry, ...]:
        """Every registered version, oldest first (blocking: the store may be read)."""
        now = self._clock()
        with self._lock:
            if self._cached is not None and now - self._cached[0] < self._ttl:
                return self._cached[1]
        store, _ = self._open()
        try:
            rows = store.models()
        finally:
            store.close()
        entries = tuple(
            sorted(
                (RegistryEntry(r["name"], int(r["version"]), r["model_id"]) for r in rows),
                key=lambda e: (e.name, e.version),
            )
        )
        with self._lock:
            self._cached = (now, entries)
        return entries

    def resolve(self, ref: str) -> str:
        """The model id ``ref`` names: itself when it is an id, else its name's newest version."""
        entries = self.entries()
        if any(e.model_id == ref for e in entries):
            return ref
        versions = [e for e in entries if e.name == ref]
        if not versions:
            raise NotFoundError(f"no model id or name {ref[:128]!r} in the registry")
        return max(versions, key=lambda e: e.version).model_id

    def index(self, service: HEService) -> list[dict[str, Any]]:
        """The gateway's repository index shape, with HE servability as the state.

        A version is ``READY`` when ``service`` can load it (signature and
        decryption verified, an exact HE plan compiled; cached after the first
        time), else ``UNAVAILABLE`` with the error's type as ``reason``, as the
        gateway reports versions it refused at load.
        """
        entries = self.entries()
        newest = {e.name: e.version for e in entries}
        out: list[dict[str, Any]] = []
        for e in entries:
            item: dict[str, Any] = {"name": e.name, "version": str(e.version)}
            try:
                service.model(e.model_id)
            except FedvaultError as exc:
                item.update(state="UNAVAILABLE", model_id=e.model_id, reason=type(exc).__name__)
            else:
                item.update(state="READY", model_id=e.model_id)
            item["default"] = e.version == newest[e.name]
            out.append(item)
        return out


def create_app(service: HEService, catalog: RegistryCatalog) -> FastAPI:
    """A stand-alone app serving the HE extension (``fedvault he serve``).

    Beside the HE routes (with model names resolved by ``catalog``), the
    probes and the repository index the gateway also answers, so an
    orchestrator and a client need not know which of the two they talk to.
    """
    app = FastAPI(title="fedvault encrypted inference", version="0.1.0")
    install_problem_handlers(app)
    app.include_router(build_router(service, catalog.resolve))

    @app.get("/v2/health/live", name="health_live", tags=["health"])
    async def health_live() -> Response:
        """Liveness: 200 while the process runs."""
        return Response(status_code=200)

    @app.get(
        "/v2/health/ready",
        name="health_ready",
        tags=["health"],
        responses=problem_responses(503),
    )
    async def health_ready() -> Response:
        """Readiness: 200 when the registry can be read and holds a model, else 503.

        Any failure to read counts as not ready (a probe must get 503, not 500),
        but the answer names only the error's type: its message may hold a path.
        """
        try:
            entries = await run_in_threadpool(catalog.entries)
        except Exception as exc:  # whatever broke, a probe answers 503
            raise UnavailableError(
                f"not ready: the model registry cannot be read ({type(exc).__name__})"
            ) from None
        if not entries:
            raise UnavailableError("not ready: the model registry holds no model")
        return Response(status_code=200)

    @app.post(
        "/v2/repository/index",
        name="repository_index",
        tags=["homomorphic inference"],
        responses=problem_responses(401),
    )
    async def repository_index(caller: Caller) -> list[dict[str, Any]]:
        """Every registered version: READY under HE, or UNAVAILABLE with the reason."""
        return await run_in_threadpool(catalog.index, service)

    return app


def registry_model_source(open_registry: OpenRegistry) -> Callable[[str], HEModel]:
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
