"""gRPC front door: ``inference.GRPCInferenceService`` on ``grpc.aio``, same core as REST.

Each RPC authenticates from the ``authorization`` metadata (gRPC lower-cases
keys), runs the shared :class:`~server.gateway.service.InferenceService`,
appends the audit record, and only then answers — or aborts with the gRPC
status of :data:`fedvault.errors.ERROR_TABLE` for the error raised, after
auditing that too. ServerLive/ServerReady are unauthenticated and unaudited,
like the REST health probes.

ModelStreamInfer (Triton's bidirectional stream) runs every message through
the same steps as a unary ModelInfer — key re-checked against revocation and
expiry through the cached verifier, rate limit, role + model grant,
validation, inference, an audit record durable before the message's answer
— but a failing message answers with ``error_message`` set and the stream
goes on, as Triton does. A missing or dead key (UNAUTHENTICATED, at the
start or when revoked or expired mid-stream) and an audit log that cannot
record (UNAVAILABLE, fail closed) end the stream.

Digests: gRPC hands us parsed messages, so the audit record carries SHA-256
of each message's deterministic protobuf serialisation (for the requests
stock clients send, the bytes on the wire).

Only the few functions here touch ``*_pb2`` types (the serde edge).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message as PbMessage

from fedvault.errors import (
    ConfigError,
    DeadlineExceededError,
    ErrorMapping,
    FedvaultError,
    InvalidRequestError,
    mapping_for,
    problem_type,
)
from server.gateway.audit import PROBE_INTERVAL_S, AuditEvent
from server.gateway.auth import Action, Principal
from server.gateway.pb import grpc_service_pb2 as pb
from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc
from server.gateway.rest import INLINE_ELEMENTS, GatewayApp, benchmark_principal
from server.gateway.tensors import (
    BYTES,
    DATATYPES,
    BytesBudget,
    InferRequest,
    InferResponse,
    RequestedOutput,
    Tensor,
    _shape,
    bytes_from_items,
    check_datatype,
    from_bytes,
    from_list,
)
from server.http_serving import ConnectionLimits, grpc_connection_options
from server.problem import unexpected_error

__all__ = [
    "STREAM_WINDOW",
    "AuditedServicer",
    "GrpcTLS",
    "InferenceServicer",
    "drain_running",
    "start_grpc_server",
]

R = TypeVar("R", bound=PbMessage)
_log = logging.getLogger(__name__)

_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


@dataclass(frozen=True, slots=True)
class GrpcTLS:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mTLS, client certificates required


# ----------------------------------------------------------------------- serde
def decode_infer_request(req: pb.ModelInferRequest) -> InferRequest:
    """``ModelInferRequest`` → the transport-independent request (400s for malformations).

    BYTES inputs come as ``contents.bytes_contents`` (one entry per element)
    or, like every datatype, as ``raw_input_contents`` (Triton's layout: per
    element a 4-byte little-endian length, then the bytes).
    """
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise InvalidRequestError(
            f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs: they must pair up"
        )
    inputs: list[Tensor] = []
    budget = BytesBudget()
    for i, t in enumerate(req.inputs):
        name = t.name[:128]
        shape = _shape(name, list(t.shape))
        if check_datatype(name, t.datatype) == BYTES:
            budget.charge(name, shape)
        if raw:
            data = from_bytes(name, t.datatype, shape, raw[i])
        elif t.datatype == BYTES:
            data = bytes_from_items(name, shape, t.contents.bytes_contents)
        else:
            field = _CONTENTS_FIELD.get(t.datatype)
            if field is None:
                raise InvalidRequestError(
                    f"tensor {name!r}: unsupported datatype {t.datatype[:32]!r}"
                )
            data = from_list(name, t.datatype, shape, list(getattr(t.contents, field)))
        inputs.append(Tensor(name, t.datatype, shape, data))
    outputs = [RequestedOutput(o.name[:128]) for o in req.outputs] or None
    return InferRequest(req.model_name, req.model_version or None, inputs, outputs, req.id or None)


def encode_infer_response(resp: InferResponse) -> pb.ModelInferResponse:
    """Outputs as ``raw_output_contents`` (what Triton sends and tritonclient reads)."""
    out = pb.ModelInferResponse(
        model_name=resp.model_name, model_version=resp.model_version, id=resp.id or ""
    )
    for t in resp.outputs:
        out.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        out.raw_output_contents.append(
            np.ascontiguousarray(t.data, dtype=DATATYPES[t.datatype]).tobytes()
        )
    return out


def _digest(message: PbMessage) -> str:
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


# -------------------------------------------------------------------- servicer
class AuditedServicer:
    """Authentication, time limit, audit and status mapping shared by every authed RPC.

    One place for the request path of all gRPC services (OIP and fedvault's
    extensions), so every RPC is authenticated, audited before it answers and
    mapped through the one error table alike.
    """

    SERVICE = "inference.GRPCInferenceService"  # full service name, for audit resources

    def __init__(self, gw: GatewayApp, *, unaudited_for_benchmark: bool = False) -> None:
        self.gw = gw
        self.svc = gw.service
        self._bare = unaudited_for_benchmark  # bench/gateway.py's baseline only

    @staticmethod
    def _authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        """The ``authorization`` metadata value (gRPC lower-cases keys), or None."""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                return value if isinstance(value, str) else value.decode("latin-1")
        return None

    @staticmethod
    def _request_id(context: grpc.aio.ServicerContext[Any, Any], request: PbMessage) -> str:
        """The audit record's request id, with REST's semantics for every unary RPC.

        REST records the ``X-Request-ID`` header or a generated id, so a
        caller can find its call in the audit log; gRPC takes the same
        ``x-request-id`` metadata first (same 200-character cap), then the
        OIP request's own ``id`` (ModelInferRequest, capped at 128 like a
        streamed message's), else a generated one.
        """
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id" and value:
                return (value if isinstance(value, str) else value.decode("latin-1"))[:200]
        if isinstance(request, pb.ModelInferRequest) and request.id:
            return str(request.id)[:128]
        return uuid.uuid4().hex

    @staticmethod
    def _mtls_subject(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        """The verified client certificate's subject (mTLS), or None."""
        auth_ctx = context.auth_context()
        for value in auth_ctx.get("x509_subject", ()) or auth_ctx.get("x509_common_name", ()):
            return value.decode("utf-8", "replace")[:200]
        return None

    async def _authenticate(self, header: str | None, event: AuditEvent) -> Principal:
        """Key → live principal (revocation, expiry, rate limit); fills the event's who.

        The cached verdict is re-checked against the store's revocation
        counter on every call, so calling this per streamed message is what
        makes a revocation reach an open stream at its next message.
        """
        auth = self.gw.authenticator
        token, key_, hit = auth.fast(header)
        if not hit:
            key_ = await asyncio.to_thread(auth.verifier.verify, token)
        principal = auth.finish(key_, peer=event.peer, mtls_subject=event.mtls_subject)
        event.key_id, event.role = principal.key_id, principal.role
        return principal

    async def _handle(
        self,
        endpoint: str,
        request: PbMessage,
        context: grpc.aio.ServicerContext[Any, Any],
        work: Callable[[Principal, AuditEvent], Awaitable[R]],
        *,
        metric_endpoint: str | None = None,
    ) -> R:
        """Authenticate, run ``work``, audit, answer (or abort with the table's status).

        ``metric_endpoint`` labels the metrics when it differs from the RPC
        name (the HE RPCs count as ``he_*``, as their REST routes do).
        """
        t0 = time.perf_counter()
        if self._bare:
            return await work(benchmark_principal(), AuditEvent("grpc", endpoint, "", 0.0))
        event = AuditEvent(
            protocol="grpc",
            endpoint=endpoint,
            resource=f"/{self.SERVICE}/{endpoint}",
            started=time.time(),
            peer=context.peer(),
            mtls_subject=self._mtls_subject(context),
            request_id=self._request_id(context, request),
        )
        # Run to completion even if the call is cancelled (client gone, deadline,
        # shutdown): a request that reached its work is always audited.
        response, error, audit_failed = await _to_completion(
            self._audited(
                event, request, self._authorization(context), work, metric_endpoint or endpoint, t0
            )
        )
        # The record's id goes back in the trailers, as REST's X-Request-ID
        # header: a caller that sent none can still find its call in the log.
        # Only printable ASCII can be a metadata value (grpc refuses the call
        # otherwise); an OIP id outside it is the caller's own, in the record.
        rid = event.request_id or ""
        trailers: tuple[tuple[str, str], ...] = (
            (("x-request-id", rid),) if rid.isascii() and rid.isprintable() else ()
        )
        if error is not None:
            mapping = mapping_for(error)
            retry = PROBE_INTERVAL_S if audit_failed else getattr(error, "retry_after_s", None)
            if retry:  # the audit store down or full is worth retrying soon, as REST says
                trailers += (("retry-after", str(int(retry))),)
            context.set_trailing_metadata(trailers)
            await context.abort(grpc.StatusCode[mapping.grpc_status], _detail(error, mapping))
        context.set_trailing_metadata(trailers)
        assert response is not None  # noqa: S101 - abort() raised otherwise
        return response

    async def _audited(
        self,
        event: AuditEvent,
        request: PbMessage,
        header: str | None,
        work: Callable[[Principal, AuditEvent], Awaitable[R]],
        metric_endpoint: str,
        t0: float,
    ) -> tuple[R | None, FedvaultError | None, bool]:
        """Authenticate, run ``work`` under the timeout, audit the outcome, count it.

        One path for a unary call and for each streamed message. Returns the
        response, the error to answer with — the work's, or the audit log's
        when it could not record (fail closed) — and whether the audit write
        failed.
        """
        response: R | None = None
        error: FedvaultError | None = None
        try:
            principal = await self._authenticate(header, event)
            async with asyncio.timeout(self.gw.limits.request_timeout_s):  # no extra task
                response = await work(principal, event)
        except TimeoutError:
            error = DeadlineExceededError(
                f"request took longer than {self.gw.limits.request_timeout_s:g} s"
            )
        except FedvaultError as exc:
            error = exc
        except Exception as exc:  # a bug: logged (type and stack only), answered INTERNAL
            error = unexpected_error(exc, request_id=event.request_id)
        event.status = mapping_for(error).grpc_status if error is not None else "OK"
        if error is not None:
            event.error_type = problem_type(type(error))
        event.request_digest = _digest(request)
        event.response_digest = _digest(response) if response is not None else None
        event.latency_s = time.perf_counter() - t0
        audit_failed = False
        try:
            await self.gw.audit.append(event)
        except FedvaultError as exc:  # UnavailableError: the request fails closed
            error, audit_failed = exc, True
            event.status = mapping_for(exc).grpc_status
        self.gw.metrics.observe_request(
            "grpc",
            metric_endpoint,
            event.model,
            event.version,
            event.status,
            time.perf_counter() - t0,
        )
        return response, error, audit_failed


def _detail(error: FedvaultError, mapping: ErrorMapping) -> str:
    """What the caller may read: the message for 4xx/503-class errors, never internals."""
    if mapping.http_status < 500 or mapping.http_status == 503:
        return str(error)
    return "internal error"


class InferenceServicer(AuditedServicer, pb_grpc.GRPCInferenceServiceServicer):
    """OIP v2 over gRPC; authorisation and inference in the shared service."""

    # -- unauthenticated probes --------------------------------------------------
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.svc.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.svc.ready())

    # -- authenticated ------------------------------------------------------------
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        async def work(p: Principal, _: AuditEvent) -> pb.ServerMetadataResponse:
            meta = self.svc.server_metadata(p)
            return pb.ServerMetadataResponse(
                name=meta["name"], version=meta["version"], extensions=meta["extensions"]
            )

        return await self._handle("ServerMetadata", request, context, work)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        async def work(p: Principal, ev: AuditEvent) -> pb.ModelReadyResponse:
            ev.model, ev.version = request.name, request.version or None
            return pb.ModelReadyResponse(
                ready=self.svc.model_ready(p, request.name, request.version or None)
            )

        return await self._handle("ModelReady", request, context, work)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        async def work(p: Principal, ev: AuditEvent) -> pb.ModelMetadataResponse:
            ev.model, ev.version = request.name, request.version or None
            model, meta = self.svc.model_metadata(p, request.name, request.version or None)
            ev.version = model.version
            out = pb.ModelMetadataResponse(
                name=meta.name, versions=meta.versions, platform=meta.platform
            )
            for t in meta.inputs:
                out.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            for t in meta.outputs:
                out.outputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            return out

        return await self._handle("ModelMetadata", request, context, work)

    async def _infer(
        self, request: pb.ModelInferRequest, p: Principal, ev: AuditEvent
    ) -> pb.ModelInferResponse:
        """One inference, unary or streamed: grant, decode, validate, infer, encode."""
        ev.model, ev.version = request.model_name, request.model_version or None
        self.svc.authorize_model(p, Action.INFER, request.model_name)
        req = decode_infer_request(request)
        if sum(t.data.size for t in req.inputs) > INLINE_ELEMENTS:
            result = await asyncio.to_thread(self.svc.infer, p, req)
        else:
            result = self.svc.infer(p, req)
        ev.version = result.model_version
        return encode_infer_response(result)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        async def work(p: Principal, ev: AuditEvent) -> pb.ModelInferResponse:
            return await self._infer(request, p, ev)

        return await self._handle("ModelInfer", request, context, work)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's bidirectional stream: one audited inference per message, answers in order.

        Why streaming at all: a unary grpc.aio call costs the server several
        times the CPU of one REST request (call set-up, metadata, status),
        and a stream pays that once. Nothing else is relaxed per message:
        the key is re-checked (revocation, expiry — the cached verifier
        re-reads the key when the revocation counter moved), the rate limit
        charged, the grant, validation and inference are ModelInfer's, and
        the message's audit record is durable before its answer is sent.

        Up to ``STREAM_WINDOW`` messages are in flight at once (see
        :func:`_read_stream`): while message *i* waits for its audit commit,
        later ones are already checked and inferred, and their records join
        the same group commit. Answers still go out in message order, each
        after its own durable record. A key revoked or expired mid-stream
        answers that message UNAUTHENTICATED and then ends the stream.
        """
        if self._bare:  # bench/gateway_stream.py's unaudited reference only
            bare = benchmark_principal()
            async for request in request_iterator:
                ev = AuditEvent("grpc", "ModelStreamInfer", "", 0.0)
                yield pb.ModelStreamInferResponse(
                    infer_response=await self._infer(request, bare, ev)
                )
            return
        header = self._authorization(context)
        peer, subject = context.peer(), self._mtls_subject(context)
        resource = f"/{self.SERVICE}/ModelStreamInfer"

        def new_event() -> AuditEvent:
            return AuditEvent(
                protocol="grpc",
                endpoint="ModelStreamInfer",
                resource=resource,
                started=time.time(),
                peer=peer,
                mtls_subject=subject,
            )

        # Stream start: a missing, wrong, revoked or expired key ends the call
        # before any message is read (audited like a refused unary call). No
        # rate-limit token is taken here: each message pays its own.
        t0 = time.perf_counter()
        opening = new_event()
        try:
            token, key_, hit = self.gw.authenticator.fast(header)
            if not hit:
                key_ = await asyncio.to_thread(self.gw.authenticator.verifier.verify, token)
            self.gw.authenticator.verifier.check_live(key_)
        except FedvaultError as exc:
            await self._refuse_stream(context, opening, exc, t0)
            return

        async def message(request: pb.ModelInferRequest) -> _StreamOutcome:
            t0 = time.perf_counter()
            event = new_event()
            event.request_id = request.id[:128] or None
            answer = functools.partial(self._stream_answer, request)
            response, error, audit_failed = await self._audited(
                event, request, header, answer, "ModelStreamInfer", t0
            )
            return _StreamOutcome(request, response, error, audit_failed)

        window = _Window(STREAM_WINDOW, self.gw.limits.max_body_bytes)
        reader = asyncio.create_task(_read_stream(request_iterator, message, window))
        try:
            while (started := await window.next()) is not None:
                pending, size = started
                # Shielded: a cancelled stream (client gone, deadline, shutdown)
                # must not cancel a message already started — it finishes and
                # is audited; only its answer is not sent.
                outcome = await asyncio.shield(pending)
                window.release(size)
                if outcome.error is None:
                    assert outcome.response is not None  # noqa: S101 - set when no error
                    yield outcome.response
                    continue
                mapping = mapping_for(outcome.error)
                yield _stream_error(outcome.request, outcome.error, mapping)
                if outcome.audit_failed:  # fail closed: nothing more unaudited
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(outcome.error))
                if mapping.grpc_status == "UNAUTHENTICATED":  # revoked or expired mid-stream
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(outcome.error))
            await reader  # re-raises what reading the client's messages raised
        finally:
            reader.cancel()

    async def _stream_answer(
        self, request: pb.ModelInferRequest, p: Principal, ev: AuditEvent
    ) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(infer_response=await self._infer(request, p, ev))

    async def _refuse_stream(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        event: AuditEvent,
        error: FedvaultError,
        t0: float,
    ) -> None:
        """Audit a stream refused at its start, then abort it with the table's status."""
        mapping = mapping_for(error)
        event.status, event.error_type = mapping.grpc_status, problem_type(type(error))
        event.latency_s = time.perf_counter() - t0
        try:
            await self.gw.audit.append(event)
        except FedvaultError as exc:
            error, mapping = exc, mapping_for(exc)
            event.status = mapping.grpc_status
        self.gw.metrics.observe_request(
            "grpc", "ModelStreamInfer", None, None, event.status, time.perf_counter() - t0
        )
        await context.abort(grpc.StatusCode[mapping.grpc_status], _detail(error, mapping))


def _stream_error(
    request: pb.ModelInferRequest, error: FedvaultError, mapping: ErrorMapping
) -> pb.ModelStreamInferResponse:
    """A failed message's answer: ``STATUS: detail`` and the request's id to correlate.

    Triton puts a plain message in ``error_message``; the gRPC status name of
    the error table in front lets a client tell a bad input from a denied
    key or a rate limit without parsing prose. Like Triton, the id of the
    failed request rides in ``infer_response.id``.
    """
    detail = _detail(error, mapping)
    retry = getattr(error, "retry_after_s", None)
    if retry:
        detail += f" (retry after {int(retry)} s)"
    return pb.ModelStreamInferResponse(
        error_message=f"{mapping.grpc_status}: {detail}",
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


STREAM_WINDOW = 32
"""Messages of one stream in flight at once (read, checked, inferred, awaiting
their audit commit or their turn to be answered), the one being answered included."""


@dataclass(frozen=True, slots=True)
class _StreamOutcome:
    """One streamed message's result, handed from its task to the answering loop."""

    request: pb.ModelInferRequest
    response: pb.ModelStreamInferResponse | None
    error: FedvaultError | None
    audit_failed: bool


class _Window:
    """The messages of one stream in flight, bounded in number and in request bytes.

    Why bytes too: a message may be as large as the gateway's body limit
    (``max_receive_message_length``), so a count alone would let one stream
    hold ``STREAM_WINDOW`` times that. A message larger than the byte budget
    still gets in when nothing else is in flight.
    """

    def __init__(self, count: int, max_bytes: int) -> None:
        self._slots = count
        self._bytes = max_bytes
        self._used = 0
        self._room = asyncio.Event()
        self._started: asyncio.Queue[tuple[asyncio.Future[_StreamOutcome], int] | None] = (
            asyncio.Queue()
        )

    async def admit(self, size: int) -> None:
        """Wait for a slot and ``size`` bytes (the reader stops reading meanwhile)."""
        while self._slots == 0 or (self._used and self._used + size > self._bytes):
            self._room.clear()
            await self._room.wait()
        self._slots -= 1
        self._used += size

    def release(self, size: int) -> None:
        self._slots += 1
        self._used -= size
        self._room.set()

    def start(self, task: asyncio.Future[_StreamOutcome], size: int) -> None:
        self._started.put_nowait((task, size))

    def end(self) -> None:
        self._started.put_nowait(None)

    async def next(self) -> tuple[asyncio.Future[_StreamOutcome], int] | None:
        """The next started message in arrival order, or None after the last."""
        return await self._started.get()


async def _read_stream(
    requests: AsyncIterator[pb.ModelInferRequest],
    handle: Callable[[pb.ModelInferRequest], Coroutine[Any, Any, _StreamOutcome]],
    window: _Window,
) -> None:
    """Start one task per incoming message, within the stream's :class:`_Window`.

    Why a window: a message's answer waits for its audit record's durable
    commit (~0.1–4 ms of fsync here), and handling one message at a time made
    that wait the stream's pace. Tasks start in arrival order; with the key's
    check cached and inputs small (the usual case) a message runs without
    yielding until its audit append, so rate-limit tokens and records follow
    arrival order too (a key re-verified in a thread, every 30 s, or a large
    input inferred in one, may let later messages overtake). The answering
    loop awaits them in arrival order, so answers keep Triton's order and each
    still follows its own durable record. A full window stops reading: a
    client cannot make the server buffer more than the window. Tasks are never
    cancelled — a message already started finishes and is audited even when
    the stream ends first (its answer is then simply not sent);
    :func:`drain_running` waits for them at shutdown.
    """
    try:
        async for request in requests:
            size = request.ByteSize()
            await window.admit(size)
            window.start(_started(handle(request)), size)
    finally:
        window.end()  # the answering loop re-raises what ended the reading, if anything


T = TypeVar("T")


def _started(work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """``work`` as a task the server keeps until it is done, whoever stops waiting for it."""
    task = asyncio.ensure_future(work)
    _RUNNING.add(task)
    task.add_done_callback(_settled)
    return task


async def _to_completion(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``; if the caller is cancelled, ``work`` still runs to its end."""
    return await asyncio.shield(_started(work))


def _settled(task: asyncio.Future[Any]) -> None:
    """Forget a finished task; log a failure nobody will await (its call is gone)."""
    _RUNNING.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        _log.error("gRPC work failed outside its audited step: %s", type(exc).__name__)


_RUNNING: set[asyncio.Future[Any]] = set()
"""Strong references to in-flight audited work (the event loop keeps only weak ones)."""


async def drain_running(timeout_s: float) -> None:
    """Wait (bounded) for audited work still running after its call ended.

    Called at shutdown after the gRPC server stopped, so that calls and
    streamed messages cut by the grace period still reach the audit log
    before the loop goes away.
    """
    loop = asyncio.get_running_loop()
    mine = {task for task in _RUNNING if task.get_loop() is loop}  # tests run several loops
    if mine:
        await asyncio.wait(mine, timeout=timeout_s)


async def start_grpc_server(
    gw: GatewayApp,
    address: str,
    *,
    tls: GrpcTLS | None = None,
    unaudited_for_benchmark: bool = False,
    connections: ConnectionLimits | None = None,
) -> grpc.aio.Server:
    """Bind and start the gRPC server; the caller owns ``stop(grace)``.

    ``connections``: handshake deadline, idle close, connection cap and
    keepalive (:func:`server.http_serving.grpc_connection_options`; the
    defaults when None), so a silent client cannot hold a socket for good.
    """
    limit = gw.limits.max_body_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # grpcio sets SO_REUSEPORT by default: a second gateway on the same
            # port would bind silently and take half the calls.
            ("grpc.so_reuseport", 0),
            *grpc_connection_options(connections or ConnectionLimits()),
        ]
    )
    servicer = InferenceServicer(gw, unaudited_for_benchmark=unaudited_for_benchmark)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    if not unaudited_for_benchmark:
        from server.gateway.grpc_extensions import add_extension_services

        add_extension_services(gw, server)
    try:
        if tls is None:
            server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials(
                [(tls.key.read_bytes(), tls.cert.read_bytes())],
                root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
                require_client_auth=tls.client_ca is not None,
            )
            server.add_secure_port(address, creds)
    except RuntimeError:  # grpcio says only "Failed to bind to address …"
        raise ConfigError(f"cannot listen for gRPC on {address} (in use, or not local)") from None
    await server.start()
    return server
