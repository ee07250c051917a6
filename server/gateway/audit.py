"""The gateway's side of the audit seam: one record per request, fail closed.

The sink is :class:`server.audit.log.AuditSink` (``AuditLog`` in production):
``append`` returns only once the record is durable. :class:`AuditGate`
awaits it before a response leaves; if it raises, the request fails with 503
and readiness turns false until an append succeeds again.

Mapping onto :class:`~server.audit.records.AuditRecord` (typed fields, so a
reviewer filters on them instead of parsing text):

- ``actor``: ``key:<key id>`` (or ``anonymous``); ``role``: the key's role, or ``none``;
- ``action``: ``<protocol>:<endpoint>`` (``rest:infer``, ``grpc:ModelInfer``);
- ``resource``: ``model:<name>/<version>`` or the request path;
- ``outcome``: ``ok``, ``denied`` (401/403, UNAUTHENTICATED/PERMISSION_DENIED)
  or ``error`` — the coarse verdict; ``status`` (HTTP status or gRPC code name),
  ``error_type`` (problem type URI) and ``latency_ms`` carry the detail;
- ``protocol`` (``rest``/``grpc``), ``peer`` (address:port as the transport saw
  it) and ``mtls_subject`` (verified client certificate) when known;
- ``request_digest`` / ``response_digest``: SHA-256 of the bodies as sent —
  never the bodies (features, ciphertexts) and never the Authorization value.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from fedvault.errors import UnavailableError
from server.audit.log import AuditSink
from server.audit.records import AuditRecord

__all__ = ["AsyncAuditSink", "AuditEvent", "AuditGate", "AuditSink", "outcome_of"]


class AsyncAuditSink(Protocol):
    """An :class:`AuditSink` that can also be awaited (``AuditLog.append_async``)."""

    async def append_async(self, record: AuditRecord) -> int: ...


def _clip(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(slots=True)
class AuditEvent:
    """What one request did; filled in by auth, the handler and the transport."""

    protocol: str
    endpoint: str
    resource: str
    started: float  # wall clock, seconds since the epoch
    key_id: str | None = None
    role: str | None = None
    peer: str | None = None
    mtls_subject: str | None = None
    model: str | None = None
    version: str | None = None
    status: str = ""
    error_type: str | None = None
    latency_s: float = 0.0
    request_id: str | None = None
    request_digest: str | None = None
    response_digest: str | None = None

    def record(self) -> AuditRecord:
        resource = (
            f"model:{self.model}/{self.version or 'default'}" if self.model else self.resource
        )
        return AuditRecord(
            time=datetime.fromtimestamp(self.started, UTC),
            actor=f"key:{self.key_id}" if self.key_id else "anonymous",
            role=self.role or "none",
            action=f"{self.protocol}:{self.endpoint}",
            resource=_clip(resource or "-"),
            outcome=outcome_of(self.status),
            request_id=_clip(self.request_id) if self.request_id else None,
            request_digest=self.request_digest,
            response_digest=self.response_digest,
            protocol=self.protocol,
            peer=_clip(self.peer) if self.peer else None,
            mtls_subject=_clip(self.mtls_subject) if self.mtls_subject else None,
            status=(self.status or "unknown")[:32],
            error_type=_clip(self.error_type) if self.error_type else None,
            # Microsecond resolution: enough to review, and a short canonical float.
            latency_ms=round(max(self.latency_s, 0.0) * 1000, 3),
        )


_DENIED = frozenset({"401", "403", "UNAUTHENTICATED", "PERMISSION_DENIED"})


def outcome_of(status: str) -> str:
    """The coarse verdict of a request from its HTTP status or gRPC code name."""
    if status == "OK" or (status.isdigit() and int(status) < 400):
        return "ok"
    return "denied" if status in _DENIED else "error"


class AuditGate:
    """Appends records for both front doors and tracks whether the sink is healthy."""

    def __init__(
        self,
        sink: AuditSink,
        *,
        observe: Callable[[float, bool], None] | None = None,
    ) -> None:
        self._sink = sink
        self._async = getattr(sink, "append_async", None)
        self._observe = observe or (lambda _s, _ok: None)
        self.healthy = True

    async def append(self, event: AuditEvent) -> None:
        """Durably append ``event`` or raise :class:`UnavailableError` (and turn unready)."""
        start = time.perf_counter()
        try:
            record = event.record()
            if self._async is not None:
                await self._async(record)
            else:
                await asyncio.to_thread(self._sink.append, record)
        except Exception:
            self.healthy = False
            self._observe(time.perf_counter() - start, False)
            # A fresh message: the sink's may name database internals.
            raise UnavailableError("the audit log cannot record this request") from None
        self.healthy = True
        self._observe(time.perf_counter() - start, True)
