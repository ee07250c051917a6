"""REST front door: Open Inference Protocol v2 over FastAPI, audited before it answers.

Why a pure ASGI middleware for audit (and not a FastAPI dependency): it must
see *every* request — our routes, the mounted HE and audit routers, 404s,
validation errors, timeouts — and it must hold the response until the audit
record is durable. It buffers the response (a few KB for plaintext
inference), appends the record, and only then sends; if the append fails the
caller gets 503 problem+json with Retry-After instead (fail closed) and
readiness turns false until the store takes appends again.
Request and response bodies are hashed as they stream; only digests reach
the log.

Health probes (``/v2/health/live``, ``/v2/health/ready``) are the only
requests not audited: they are unauthenticated, carry no data, and a
Kubernetes probe every few seconds would bury the log in noise.
"""

# No ``from __future__ import annotations``: FastAPI must resolve the
# dependency aliases defined inside create_rest_app at runtime.
import asyncio
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedvault import logs
from fedvault.errors import (
    DeadlineExceededError,
    FedvaultError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)
from server.audit.log import AuditLog
from server.gateway.audit import (
    CLIENT_DISCONNECTED,
    NO_STATUS,
    PROBE_INTERVAL_S,
    AuditEvent,
    AuditGate,
)
from server.gateway.auth import Action, Authenticator, Principal, authorize
from server.gateway.codec import CodecPool
from server.gateway.keys import ROLES, ApiKey, GatewayStore, parse_expiry
from server.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from server.gateway.service import InferenceService
from server.http_serving import CONNECTION_LOST, SENT_BY_SERVER
from server.problem import (
    PROBLEM_JSON,
    install_problem_handlers,
    problem_response,
    problem_responses,
    unexpected_error,
)
from server.store import FederationStore

__all__ = ["AUDIT_SCOPE_KEY", "GatewayApp", "Limits", "create_rest_app"]

AUDIT_SCOPE_KEY: Final = "fedvault.audit"
UNAUDITED: Final = frozenset({"/v2/health/live", "/v2/health/ready"})
INFER_ROUTES: Final = frozenset({"infer", "infer_version"})
INLINE_ELEMENTS: Final = 65_536  # larger batches run on a worker thread, not the loop
LARGE_RESPONSE_BYTES: Final = 1024 * 1024  # larger bodies are hashed on a worker thread
HE_CALLER_HEADER: Final = "X-Fedvault-Caller"
"""``server.he_api``'s stand-alone identity header; the gateway overrides it with bearer auth."""
EMPTY_BODY: Final = {"x-fedvault-empty-body": True}
"""``openapi_extra`` of routes answering 200 with no body (the status is the answer)."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 64 * 1024**2
    request_timeout_s: float = 30.0
    audit_timeout_s: float = 10.0  # a request's record durable within this, else 503


@dataclass
class GatewayApp:
    """Everything the front doors share (one per gateway process)."""

    service: InferenceService
    authenticator: Authenticator
    audit: AuditGate
    metrics: GatewayMetrics
    store: GatewayStore
    open_federation: Callable[[], FederationStore]
    limits: Limits = field(default_factory=Limits)
    he_service: Any = None  # secure.he.service.HEService, when enabled
    he_router: APIRouter | None = None
    he_owner_dependency: Any = None  # server.he_api.caller_identity, when mounted
    audit_router: APIRouter | None = None
    audit_dependency: Any = None  # server.audit.api.require_auditor, when mounted
    audit_log: AuditLog | None = None  # read side of the audit API (REST router, gRPC mirror)
    console_router: APIRouter | None = None  # server.console (HTML under /console), when enabled
    codec: CodecPool = field(default_factory=CodecPool)  # large REST infer bodies, off the loop


# ----------------------------------------------------------------- schemas (docs)
class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequestBody(BaseModel):
    """OIP v2 inference request (JSON form; the binary extension appends raw data)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(default=None, max_length=32)


class KeyCreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["admin", "analyst", "partner", "auditor"]
    models: list[str] = Field(default_factory=list, max_length=100)
    partner: str | None = Field(default=None, max_length=200)
    expires: str | None = Field(default=None, max_length=64)
    description: str = Field(default="", max_length=200)


class KeyInfo(BaseModel):
    key_id: str
    role: str
    models: list[str]
    partner: str | None
    description: str
    created_at: str | None
    expires_at: str | None
    revoked: bool


class CreatedKey(KeyInfo):
    token: str = Field(description="Shown once; store it now.")


AUTHED = (401, 403, 429, 503, 504)
_INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequestBody"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Binary tensor data extension: a JSON header of "
                "Inference-Header-Content-Length bytes, then raw tensor data.",
            },
        },
    },
}


# ------------------------------------------------------------------- middleware
class AuditMiddleware:
    """Time, hash, limit and audit every HTTP request; hold the response until audited."""

    def __init__(self, app: ASGIApp, gateway: GatewayApp) -> None:
        self.app = app
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in UNAUDITED:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        client = scope.get("client")
        event = AuditEvent(
            protocol="rest",
            endpoint="unmatched",
            resource=scope["path"][:500],
            started=time.time(),
            peer=f"{client[0]}:{client[1]}" if client else None,
            mtls_subject=scope.get("fedvault.mtls_subject"),
            request_id=_header(scope, b"x-request-id") or uuid.uuid4().hex,
        )
        scope[AUDIT_SCOPE_KEY] = event
        # For log records (fedvault.logs): uvicorn runs each request in its own
        # task, whose context copy this set stays in, so no reset is needed.
        logs.request_id.set(event.request_id)
        limit = self.gw.limits.max_body_bytes
        req_hash = hashlib.sha256()
        received = 0
        left = False  # the client went away before the answer (http.disconnect)

        async def receive_hashed() -> Message:
            nonlocal received, left
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
                req_hash.update(chunk)
            elif message["type"] == "http.disconnect":
                left = True
            return message

        start: Message | None = None
        chunks: list[bytes] = []

        async def send_buffered(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        declared = _header(scope, b"content-length")
        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLargeError(
                    f"request body is {declared} bytes, the limit is {limit}"
                )
            # asyncio.timeout, not wait_for: no extra task per request (same deadline).
            async with asyncio.timeout(self.gw.limits.request_timeout_s):
                await self.app(scope, receive_hashed, send_buffered)
        except TimeoutError:
            start, chunks = _problem_messages(
                DeadlineExceededError(
                    f"request took longer than {self.gw.limits.request_timeout_s:g} s"
                )
            )
        except FedvaultError as exc:
            start, chunks = _problem_messages(exc)
        except ClientDisconnect:  # not a bug: audited below as what it is
            left = True
            start, chunks = _problem_messages(FedvaultError("client disconnected"))
        except Exception as exc:  # a bug: logged (type and stack only), answered 500
            start, chunks = _problem_messages(unexpected_error(exc, request_id=event.request_id))
        if start is None:
            start, chunks = _problem_messages(FedvaultError("internal error"))
        body = b"".join(chunks)
        status = int(start["status"])
        route = scope.get("route")
        event.endpoint = getattr(route, "name", None) or "unmatched"
        # Audit what the client got: the HTTP server's own answer when it gave one
        # (a malformed body's 400, a stalled body's 408; server.http_serving), or
        # nothing at all when the client left first — not the app's fallback 500.
        sent = scope.get(SENT_BY_SERVER)
        if sent is not None:
            status, body = sent
            start = {"type": "http.response.start", "status": status, "headers": []}
        if sent is None and (left or scope.get(CONNECTION_LOST)):
            event.outcome, event.status = CLIENT_DISCONNECTED, NO_STATUS
        else:
            event.status = str(status)
            if status >= 400:
                event.error_type = _problem_type(start, body)
            event.response_digest = await _sha256(body)
        event.request_digest = req_hash.hexdigest()
        event.latency_s = time.perf_counter() - t0
        try:
            await self.gw.audit.append(event)
        except FedvaultError as exc:
            # The store is down or full: worth retrying soon, here or at another replica.
            start, chunks = _problem_messages(exc, retry_after_s=PROBE_INTERVAL_S)
            body = b"".join(chunks)
            status = int(start["status"])
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        headers.append((b"x-request-id", (event.request_id or "").encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self.gw.metrics.observe_request(
            "rest",
            event.endpoint,
            event.model,
            event.version,
            event.status if event.outcome else str(status),
            time.perf_counter() - t0,
        )


async def _sha256(body: bytes) -> str:
    """Hex SHA-256 of a response body; a large one on a thread (hashlib releases the
    GIL), since tens of MB take the loop ~100 ms that health probes would wait."""
    if len(body) <= LARGE_RESPONSE_BYTES:
        return hashlib.sha256(body).hexdigest()
    return await run_in_threadpool(lambda: hashlib.sha256(body).hexdigest())


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            text: str = value.decode("latin-1")[:200]
            return text
    return None


def _problem_messages(
    error: FedvaultError, *, retry_after_s: float | None = None
) -> tuple[Message, list[bytes]]:
    retry = {"Retry-After": str(math.ceil(retry_after_s))} if retry_after_s else None
    response = problem_response(error, headers=retry)
    return (
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        },
        [bytes(response.body)],
    )


def _problem_type(start: Message, body: bytes) -> str:
    for key, value in start.get("headers", ()):
        if key.lower() == b"content-type" and value.startswith(PROBLEM_JSON.encode()):
            try:
                kind = json.loads(body).get("type")
            except (ValueError, AttributeError):
                break
            return str(kind)[:100] if kind else "-"
    return f"http-{start['status']}"


# ------------------------------------------------------------------------ auth
_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer fvk_...`")


def _event(request: Request) -> AuditEvent | None:
    event = request.scope.get(AUDIT_SCOPE_KEY)
    return event if isinstance(event, AuditEvent) else None


async def authenticate(
    auth: Authenticator, header: str | None, event: AuditEvent | None
) -> Principal:
    """Bearer key → principal (scrypt only on a cache miss, off the loop); noted in the event."""
    token, key, hit = auth.fast(header)
    if not hit:
        key = await run_in_threadpool(auth.verifier.verify, token)
    principal = auth.finish(
        key,
        peer=event.peer if event else None,
        mtls_subject=event.mtls_subject if event else None,
    )
    if event is not None:
        event.key_id, event.role = principal.key_id, principal.role
    return principal


def principal_dependency(gw: GatewayApp) -> Callable[..., Awaitable[Principal]]:
    auth = gw.authenticator

    async def authenticated(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        return await authenticate(auth, request.headers.get("authorization"), _event(request))

    return authenticated


async def infer_payload(
    svc: InferenceService,
    codec: CodecPool,
    principal: Principal,
    name: str,
    version: str | None,
    body: Sequence[bytes],
    header_length: str | None,
    event: AuditEvent | None,
) -> tuple[bytes, int | None]:
    """Decode, infer, encode one REST infer body, given as the chunks it arrived in
    (the caller checked the grant already).

    Large bodies are decoded and large answers encoded in ``codec``'s worker
    processes and large batches inferred on a thread, so one big request does
    not hold the event loop (and every other request, health probes included).
    """
    req = await codec.decode(name, version, body, header_length)
    elements = sum(t.data.size for t in req.inputs)
    if elements > INLINE_ELEMENTS:
        result = await run_in_threadpool(svc.infer, principal, req)
    else:
        result = svc.infer(principal, req)
    if event is not None:
        event.model, event.version = name, result.model_version
    return await codec.encode(req, result)


_INFER_PATH: Final = re.compile(r"/v2/models/([^/]+)/(?:versions/([^/]+)/)?infer")
MAX_NAME: Final = 200
MAX_VERSION: Final = 32


class InferFastPath:
    """``POST /v2/models/{m}[/versions/{v}]/infer`` straight to the service layer.

    Why: profiling the audited infer under load (py-spy, bench/gateway.py's
    load) put ~55% of the event loop's CPU in FastAPI's routing and
    per-request dependency solving — re-derived from signatures on every
    request because the gateway overrides the mounted HE/audit routers'
    dependencies — against ~20% in the handler itself. The infer routes are
    the hot path, so this ASGI layer (inside the audit middleware, which is
    unchanged: timing, body limit and digests, timeout, durable audit before
    the answer) serves them with the same steps in the same order: bearer
    authentication, role and grant check before the body is read, the same
    codecs and service, the same problem+json errors. The FastAPI routes stay
    for the OpenAPI document and for whatever this declines (a name or
    version beyond the routes' length limits, which FastAPI refuses with 400).
    """

    def __init__(
        self,
        app: ASGIApp,
        gateway: GatewayApp,
        routes: dict[str, Any],
        bare: bool = False,
    ) -> None:
        self.app = app
        self.gw = gateway
        self.routes = routes  # route name -> FastAPI route (audit endpoint name)
        self.bare = bare  # bench/gateway.py's auth-and-audit-off baseline only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            match = _INFER_PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        name, version = match.group(1), match.group(2)
        if len(name) > MAX_NAME or (version is not None and len(version) > MAX_VERSION):
            await self.app(scope, receive, send)
            return
        route = self.routes.get("infer_version" if version is not None else "infer")
        if route is not None:
            scope["route"] = route
        authorization = header_length = None
        for key, value in scope["headers"]:
            if key == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif key == b"inference-header-content-length" and header_length is None:
                header_length = value.decode("latin-1")
        event = scope.get(AUDIT_SCOPE_KEY)
        event = event if isinstance(event, AuditEvent) else None
        try:
            if self.bare:
                principal = benchmark_principal()
            else:
                principal = await authenticate(self.gw.authenticator, authorization, event)
            if event is not None:
                event.model, event.version = name, version
            self.gw.service.authorize_model(principal, Action.INFER, name)  # before the body
            body = await _read_body(receive)
            payload, head = await infer_payload(
                self.gw.service, self.gw.codec, principal, name, version, body, header_length, event
            )
        except FedvaultError as exc:
            await problem_response(exc)(scope, receive, send)
            return
        headers = [
            (b"content-length", str(len(payload)).encode()),
            (
                b"content-type",
                b"application/json" if head is None else b"application/octet-stream",
            ),
        ]
        if head is not None:
            headers.append((b"inference-header-content-length", str(head).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def _read_body(receive: Receive) -> list[bytes]:
    """The request body as the chunks it arrived in: joining tens of MB would be one
    copy on the event loop; a large body goes to the codec workers chunk by chunk."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return chunks
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect


def _note_model(request: Request, name: str | None, version: str | None) -> None:
    event = _event(request)
    if event is not None:
        event.model, event.version = name, version


ModelName = Annotated[str, Path(min_length=1, max_length=MAX_NAME)]
ModelVersion = Annotated[str, Path(min_length=1, max_length=MAX_VERSION)]


# ------------------------------------------------------------------------- app
def benchmark_principal() -> Principal:
    """A fixed analyst for the auth-and-audit-off baseline of ``bench/gateway.py`` only."""
    key = ApiKey("benchmark", "analyst", frozenset({"*"}), None, "", 0.0, None, None)
    return Principal(key)


def create_rest_app(gw: GatewayApp, *, unaudited_for_benchmark: bool = False) -> FastAPI:
    """The REST app: OIP v2, repository admin, keys, partner reads, metrics, HE, audit.

    ``unaudited_for_benchmark`` drops authentication and audit to measure their
    cost; no CLI path sets it.
    """
    app = FastAPI(
        title="fedvault gateway",
        version="0.1.0",
        description="Open Inference Protocol v2 with authentication, authorisation and audit.",
    )
    install_problem_handlers(app)  # incl. Starlette's 404/405 as problem+json
    fast_routes: dict[str, Any] = {}  # filled once the infer routes exist
    # Starlette runs the last-added middleware outermost: audit wraps the fast path.
    app.add_middleware(InferFastPath, gateway=gw, routes=fast_routes, bare=unaudited_for_benchmark)
    if not unaudited_for_benchmark:
        app.add_middleware(AuditMiddleware, gateway=gw)
    svc = gw.service
    auth_dependency = benchmark_principal if unaudited_for_benchmark else principal_dependency(gw)
    Authed = Annotated[Principal, Depends(auth_dependency)]

    # -- health (unauthenticated) -------------------------------------------------
    @app.get("/v2/health/live", name="health_live", tags=["health"], openapi_extra=EMPTY_BODY)
    async def health_live() -> Response:
        """Liveness: 200 while the process runs."""
        return Response(status_code=200)

    @app.get(
        "/v2/health/ready",
        name="health_ready",
        tags=["health"],
        responses=problem_responses(503),
        openapi_extra=EMPTY_BODY,
    )
    async def health_ready() -> Response:
        """Readiness: 200 when models are loaded and the audit log is writable and intact."""
        if not svc.ready():
            # A damaged entry is named by index (never content): the operator's first clue.
            damage = gw.audit_log.integrity.problem() if gw.audit_log is not None else None
            raise UnavailableError(
                f"not ready: {damage}"
                if damage
                else "not ready (audit log failing or no model loaded)"
            )
        return Response(status_code=200)

    # -- OIP metadata --------------------------------------------------------------
    @app.get(
        "/v2",
        name="server_metadata",
        tags=["inference"],
        response_model=ServerMetadataResponse,
        responses=problem_responses(*AUTHED),
    )
    async def server_metadata(principal: Authed) -> dict[str, Any]:
        return svc.server_metadata(principal)

    async def _model_metadata(
        request: Request, principal: Principal, name: str, version: str | None
    ) -> dict[str, Any]:
        _note_model(request, name, version)
        model, meta = svc.model_metadata(principal, name, version)
        _note_model(request, name, model.version)
        return meta.as_dict()

    @app.get(
        "/v2/models/{model_name}",
        name="model_metadata",
        tags=["inference"],
        response_model=ModelMetadataResponse,
        responses=problem_responses(*AUTHED, 404),
    )
    async def model_metadata(
        request: Request, model_name: ModelName, principal: Authed
    ) -> dict[str, Any]:
        return await _model_metadata(request, principal, model_name, None)

    @app.get(
        "/v2/models/{model_name}/versions/{model_version}",
        name="model_version_metadata",
        tags=["inference"],
        response_model=ModelMetadataResponse,
        responses=problem_responses(*AUTHED, 404),
    )
    async def model_version_metadata(
        request: Request, model_name: ModelName, model_version: ModelVersion, principal: Authed
    ) -> dict[str, Any]:
        return await _model_metadata(request, principal, model_name, model_version)

    async def _model_ready(
        request: Request, principal: Principal, name: str, version: str | None
    ) -> Response:
        _note_model(request, name, version)
        if not svc.model_ready(principal, name, version):
            raise UnavailableError("model is not ready (refused at load or no such version)")
        return Response(status_code=200)

    @app.get(
        "/v2/models/{model_name}/ready",
        name="model_ready",
        openapi_extra=EMPTY_BODY,
        tags=["inference"],
        responses=problem_responses(*AUTHED, 404),
    )
    async def model_ready(request: Request, model_name: ModelName, principal: Authed) -> Response:
        """200 when the default version can serve; 503 problem+json otherwise."""
        return await _model_ready(request, principal, model_name, None)

    @app.get(
        "/v2/models/{model_name}/versions/{model_version}/ready",
        name="model_version_ready",
        openapi_extra=EMPTY_BODY,
        tags=["inference"],
        responses=problem_responses(*AUTHED, 404),
    )
    async def model_version_ready(
        request: Request, model_name: ModelName, model_version: ModelVersion, principal: Authed
    ) -> Response:
        """200 when this version can serve; 503 problem+json otherwise."""
        return await _model_ready(request, principal, model_name, model_version)

    # -- OIP infer -----------------------------------------------------------------
    async def _infer(
        request: Request, principal: Principal, name: str, version: str | None
    ) -> Response:
        _note_model(request, name, version)
        svc.authorize_model(principal, Action.INFER, name)  # before reading the body
        body = await request.body()
        payload, header_length = await infer_payload(
            svc,
            gw.codec,
            principal,
            name,
            version,
            [body],
            request.headers.get("inference-header-content-length"),
            _event(request),
        )
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_length)},
        )

    infer_responses: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "Inference result (JSON, or JSON header + binary data).",
            "content": {
                "application/json": {"schema": InferResponseBody.model_json_schema()},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **problem_responses(*AUTHED, 400, 404, 413),
    }

    @app.post(
        "/v2/models/{model_name}/infer",
        name="infer",
        tags=["inference"],
        openapi_extra=_INFER_OPENAPI,
        responses=infer_responses,
    )
    async def infer(request: Request, model_name: ModelName, principal: Authed) -> Response:
        return await _infer(request, principal, model_name, None)

    @app.post(
        "/v2/models/{model_name}/versions/{model_version}/infer",
        name="infer_version",
        tags=["inference"],
        openapi_extra=_INFER_OPENAPI,
        responses=infer_responses,
    )
    async def infer_version(
        request: Request, model_name: ModelName, model_version: ModelVersion, principal: Authed
    ) -> Response:
        return await _infer(request, principal, model_name, model_version)

    fast_routes.update(
        {getattr(r, "name", ""): r for r in app.routes if getattr(r, "name", "") in INFER_ROUTES}
    )

    # -- repository admin (Triton's model-repository extension, admin only) ---------
    @app.post(
        "/v2/repository/index",
        name="repository_index",
        tags=["admin"],
        responses=problem_responses(*AUTHED),
    )
    async def repository_index(principal: Authed) -> list[dict[str, Any]]:
        """Every registered version: READY, or UNAVAILABLE with the refusal reason."""
        authorize(principal, Action.MODELS_ADMIN)
        return gw.service.repository.index()

    @app.post(
        "/v2/repository/reload",
        name="repository_reload",
        tags=["admin"],
        responses=problem_responses(*AUTHED),
    )
    async def repository_reload(principal: Authed) -> list[dict[str, Any]]:
        """Reload every version from the registry (verifying each again); the new index."""
        authorize(principal, Action.MODELS_ADMIN)
        await run_in_threadpool(gw.service.repository.load_all)
        return gw.service.repository.index()

    @app.post(
        "/v2/repository/models/{model_name}/rollback",
        name="model_rollback",
        tags=["admin"],
        responses=problem_responses(*AUTHED, 400, 404, 409),
    )
    async def model_rollback(
        request: Request, model_name: ModelName, body: RollbackBody, principal: Authed
    ) -> dict[str, Any]:
        """Make ``version`` (default: the version before the current default) the default."""
        authorize(principal, Action.MODELS_ADMIN)
        _note_model(request, model_name, body.version)
        version = await run_in_threadpool(
            gw.service.repository.rollback,
            model_name,
            body.version,
            actor=f"key:{principal.key_id}",
        )
        _note_model(request, model_name, version)
        return {"name": model_name, "default_version": version}

    # -- keys (admin) ----------------------------------------------------------------
    @app.get(
        "/v2/admin/keys",
        name="keys_list",
        tags=["admin"],
        response_model=list[KeyInfo],
        responses=problem_responses(*AUTHED),
    )
    async def keys_list(principal: Authed) -> list[dict[str, Any]]:
        authorize(principal, Action.KEYS_ADMIN)
        return [k.public() for k in await run_in_threadpool(gw.store.keys)]

    @app.post(
        "/v2/admin/keys",
        name="keys_create",
        tags=["admin"],
        status_code=201,
        response_model=CreatedKey,
        responses=problem_responses(*AUTHED, 400),
    )
    async def keys_create(body: KeyCreateBody, principal: Authed) -> dict[str, Any]:
        """Create a key; the token is in this response only."""
        authorize(principal, Action.KEYS_ADMIN)
        if body.role not in ROLES:  # pragma: no cover - Literal already enforces it
            raise InvalidRequestError("unknown role")
        token, key = await run_in_threadpool(
            lambda: gw.store.create_key(
                body.role,
                models=frozenset(body.models),
                partner=body.partner,
                expires_at=parse_expiry(body.expires),
                description=body.description,
            )
        )
        return {**key.public(), "token": token}

    @app.delete(
        "/v2/admin/keys/{key_id}",
        name="keys_revoke",
        tags=["admin"],
        response_model=KeyInfo,
        responses=problem_responses(*AUTHED, 404),
    )
    async def keys_revoke(
        key_id: Annotated[str, Path(max_length=32)], principal: Authed
    ) -> dict[str, Any]:
        authorize(principal, Action.KEYS_ADMIN)
        key = await run_in_threadpool(gw.store.revoke, key_id)
        gw.authenticator.verifier.forget(key_id)
        return key.public()

    # -- partner reads ----------------------------------------------------------------
    def _partner_runs(partner: str) -> list[dict[str, Any]]:
        store = gw.open_federation()
        try:
            mine = {row.charge.run_id for row in store.ledger() if row.partner == partner}
            return [
                {
                    "run_id": r.run_id,
                    "status": r.status,
                    "round": r.current_round,
                    "model_id": r.model_id,
                    "created_at": r.created_at,
                }
                for r in store.runs()
                if r.run_id in mine
            ]
        finally:
            store.close()

    def _partner_ledger(partner: str, run_id: str) -> list[dict[str, Any]]:
        store = gw.open_federation()
        try:
            rows = [r for r in store.ledger(run_id) if r.partner == partner]
        finally:
            store.close()
        if not rows:
            raise NotFoundError("no ledger rows of this partner for that run")
        return [{"partner": r.partner, **asdict(r.charge)} for r in rows]

    @app.get(
        "/v2/partner/runs",
        name="partner_runs",
        tags=["partner"],
        responses=problem_responses(*AUTHED),
    )
    async def partner_runs(principal: Authed) -> list[dict[str, Any]]:
        """Runs this partner took part in."""
        authorize(principal, Action.PARTNER_READ)
        return await run_in_threadpool(_partner_runs, principal.key.partner or "")

    @app.get(
        "/v2/partner/runs/{run_id}/ledger",
        name="partner_ledger",
        tags=["partner"],
        responses=problem_responses(*AUTHED, 404),
    )
    async def partner_ledger(
        run_id: Annotated[str, Path(max_length=200)], principal: Authed
    ) -> list[dict[str, Any]]:
        """This partner's privacy-ledger rows of one run (other partners' rows stay hidden)."""
        authorize(principal, Action.PARTNER_READ)
        return await run_in_threadpool(_partner_ledger, principal.key.partner or "", run_id)

    # -- metrics (auditor) ----------------------------------------------------------
    @app.get(
        "/metrics",
        name="metrics",
        tags=["monitoring"],
        responses={200: {"content": {CONTENT_TYPE: {}}}, **problem_responses(*AUTHED)},
    )
    async def metrics(principal: Authed) -> Response:
        """Prometheus exposition (scrape with an auditor key as a bearer credential)."""
        authorize(principal, Action.METRICS)
        svc.ready()
        payload = await run_in_threadpool(gw.metrics.exposition)
        return Response(payload, media_type=CONTENT_TYPE)

    # -- mounted routers: HE extension and audit log --------------------------------
    if gw.he_router is not None and gw.he_owner_dependency is not None:
        app.include_router(gw.he_router)

        async def he_owner(
            request: Request,
            principal: Annotated[Principal, Depends(principal_dependency(gw))],
        ) -> str:
            model_ref = request.path_params.get("model_id")
            name = _he_model_name(gw, model_ref) if model_ref else None
            _note_model(request, name, None)
            authorize(principal, Action.HE, model=name)
            # The owner of registered contexts: a key can use only its own contexts.
            return f"key:{principal.key_id}"

        app.dependency_overrides[gw.he_owner_dependency] = he_owner
    if gw.audit_router is not None and gw.audit_dependency is not None:
        app.include_router(gw.audit_router)

        async def auditor(
            principal: Annotated[Principal, Depends(principal_dependency(gw))],
        ) -> None:
            authorize(principal, Action.AUDIT_READ)

        app.dependency_overrides[gw.audit_dependency] = auditor
    if gw.console_router is not None and not unaudited_for_benchmark:
        # Inside this app, so AuditMiddleware records every console request too.
        app.include_router(gw.console_router)
    _make_openapi_accurate(app)
    return app


def _make_openapi_accurate(app: FastAPI) -> None:
    """Post-process FastAPI's document so it states what the gateway really answers.

    Why: FastAPI documents a 422 ``HTTPValidationError`` that never leaves
    (our handler turns validation errors into 400 problem+json), knows nothing
    of what the audit middleware and auth add to every route (401/403, 429,
    503 when the audit log fails, 504, 413 for bodies), and documents the
    dependencies the mounted HE/audit routers were *written* with
    (``X-Fedvault-Caller``) rather than the bearer auth that overrides them.
    It walks the generated document, not ``app.routes`` (whose included
    routers are FastAPI internals).
    """
    problem = problem_responses(400, 401, 403, 413, 429, 503, 504)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["HTTPBearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "API key: `Authorization: Bearer fvk_...`",
        }
        for path, operations in schema["paths"].items():
            for method, op in operations.items():
                _fix_operation(path, method.upper(), op, problem)
        used = json.dumps(schema["paths"])
        for name in ("HTTPValidationError", "ValidationError"):
            if f"#/components/schemas/{name}" not in used:
                components.get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _fix_operation(
    path: str, method: str, op: dict[str, Any], problem: dict[int | str, dict[str, Any]]
) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    validation = responses.get("422", {}).get("content", {}).get("application/json", {})
    if "HTTPValidationError" in json.dumps(validation):
        del responses["422"]  # FastAPI's: never sent (400 problem+json instead)
    if op.pop("x-fedvault-empty-body", False):
        responses["200"] = {"description": "OK (empty body)"}
    params = [p for p in op.get("parameters", []) if p.get("name") != HE_CALLER_HEADER]
    if params:
        op["parameters"] = params
    else:
        op.pop("parameters", None)
    if path in UNAUDITED:
        return  # health probes: no key, no audit
    op["security"] = [{"HTTPBearer": []}]
    wanted = [401, 403, 429, 503, 504]
    if params or "requestBody" in op:
        wanted.append(400)
    if "requestBody" in op or method in ("POST", "PUT", "PATCH"):
        wanted.append(413)
    for code in wanted:
        responses.setdefault(str(code), problem[code])


def _he_model_name(gw: GatewayApp, ref: str) -> str:
    """HE routes address a model by registry id or by name; grants are by name."""
    try:
        return gw.service.repository.by_model_id(ref).name
    except NotFoundError:
        return ref
