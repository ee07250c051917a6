"""The gateway's side of the audit seam: one record per request, fail closed.

The sink is :class:`server.audit.log.AuditSink` (``AuditLog`` in production):
``append`` returns only once the record is durable. :class:`AuditGate`
awaits it before a response leaves; if it raises (the database is down, the
disk is full), the request fails with 503 and readiness turns false until an
append succeeds again. Why the gate then probes the store itself: once
unready, a load balancer sends no more requests, so without a probe nothing
would ever append again and the gateway would stay out of rotation after the
store came back. The probe's append is a real record (``gateway:audit-recovered``,
saying since when appends failed and how many requests were refused), so
an auditor also sees the outage in the log.

Mapping onto :class:`~server.audit.records.AuditRecord` (typed fields, so a
reviewer filters on them instead of parsing text):

- ``actor``: ``key:<key id>`` (or ``anonymous``); ``role``: the key's role, or ``none``;
- ``action``: ``<protocol>:<endpoint>`` (``rest:infer``, ``grpc:ModelInfer``);
- ``resource``: ``model:<name>/<version>`` or the request path;
- ``outcome``: ``ok``, ``denied`` (401/403, UNAUTHENTICATED/PERMISSION_DENIED)
  or ``error`` — the coarse verdict; ``status`` (HTTP status or gRPC code name),
  ``error_type`` (problem type URI) and ``latency_ms`` carry the detail. The
  status is the one the client was sent — the HTTP server's own 400 for a
  malformed body, say, not what the app would have answered — and a REST
  client that went away before any answer reached it is recorded as
  ``client-disconnected`` with status ``none`` (no response digest);
- ``protocol`` (``rest``/``grpc``), ``peer`` (address:port as the transport saw
  it) and ``mtls_subject`` (verified client certificate) when known;
- ``request_digest`` / ``response_digest``: SHA-256 of the bodies as sent —
  never the bodies (features, ciphertexts) and never the Authorization value.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from fedvault.errors import UnavailableError
from server.audit.log import AuditSink
from server.audit.records import AuditRecord, canonical_bytes, encode_record, format_time

_log = logging.getLogger(__name__)

__all__ = [
    "APPEND_TIMEOUT_S",
    "CLIENT_DISCONNECTED",
    "NO_STATUS",
    "PROBE_INTERVAL_S",
    "AsyncAuditSink",
    "AuditEvent",
    "AuditGate",
    "AuditSink",
    "outcome_of",
]

CLIENT_DISCONNECTED: Final = "client-disconnected"
"""Outcome of a request whose client left before any response reached it."""
NO_STATUS: Final = "none"
"""Its status: no response was sent, so none is recorded (not the app's unsent 500)."""
PROBE_INTERVAL_S: Final = 1.0
"""While appends fail, the gate tries a probe record this often (see the module doc)."""
APPEND_TIMEOUT_S: Final = 10.0
"""Longest a request waits for its record to be durable before it is refused (503)."""


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
    outcome: str | None = None  # set only when the status alone cannot say it

    def _fields(self) -> dict[str, Any]:
        """The record's fields as :class:`AuditRecord` receives them (unset ones omitted)."""
        status = self.status or "unknown"
        fields: dict[str, Any] = {
            "time": datetime.fromtimestamp(self.started, UTC),
            "actor": f"key:{self.key_id}" if self.key_id else "anonymous",
            "role": self.role or "none",
            "action": f"{self.protocol}:{self.endpoint}",
            "resource": _clip(
                (f"model:{self.model}/{self.version or 'default'}" if self.model else self.resource)
                or "-"
            ),
            "outcome": self.outcome or outcome_of(status),
            "protocol": self.protocol,
            "status": status[:32],
            # Microsecond resolution: enough to review, and a short canonical float.
            "latency_ms": round(max(self.latency_s, 0.0) * 1000, 3),
        }
        for name, value in (
            ("request_id", self.request_id),
            ("request_digest", self.request_digest),
            ("response_digest", self.response_digest),
            ("peer", self.peer),
            ("mtls_subject", self.mtls_subject),
            ("error_type", self.error_type),
        ):
            if value:
                fields[name] = value if name.endswith("digest") else _clip(value)
        return fields

    def record(self) -> AuditRecord:
        return AuditRecord(**self._fields())

    def entry(self) -> bytes:
        """Canonical bytes of :meth:`record`, without building the pydantic model.

        Why: validating and dumping the model cost ~11.7 µs of the event loop
        per request (``AuditRecord`` + ``encode_record``), this ~8.2 µs — the
        record is the largest single item of the audited path after storage. The fields are the same
        ones and go through the same canonical encoder, so the bytes are the
        same; whenever a value could fall outside the record's constraints
        (length, digest form, a non-finite number) this defers to the model,
        which validates (and raises) exactly as before.
        ``tests/test_gateway_audit_entry.py`` checks the equality on generated events.
        """
        fields = self._fields()
        for name, value in fields.items():
            if isinstance(value, str) and not 0 < len(value) <= _FAST_LIMITS.get(name, 500):
                return encode_record(self.record())
        for name in ("request_digest", "response_digest"):
            digest = fields.get(name)
            if digest is not None and _DIGEST.fullmatch(digest) is None:
                return encode_record(self.record())
        if not math.isfinite(fields["latency_ms"]):
            return encode_record(self.record())
        fields["time"] = format_time(fields["time"])
        return canonical_bytes(fields)


_FAST_LIMITS: Final = {"protocol": 32, "status": 32}
"""Upper lengths the fast path accepts (the record allows 32 for these, 512 for the rest)."""
_DIGEST: Final = re.compile(r"[0-9a-f]{64}")


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
        probe_interval_s: float = PROBE_INTERVAL_S,
        append_timeout_s: float = APPEND_TIMEOUT_S,
    ) -> None:
        self._sink = sink
        self._append_timeout_s = append_timeout_s
        # ``AuditLog.append_entry_async`` takes the canonical bytes (AuditEvent.entry);
        # other sinks get the record.
        self._entry_async = getattr(sink, "append_entry_async", None)
        self._async = getattr(sink, "append_async", None)
        self._observe = observe or (lambda _s, _ok: None)
        self._probe_interval_s = probe_interval_s
        self.healthy = True
        self._failing_since: float | None = None  # wall clock of the first failed append
        self._refused = 0  # requests failed closed since then
        self._abandoned = 0  # of those, refused at the timeout: their writes may still commit
        self._probe: asyncio.Task[None] | None = None

    async def append(self, event: AuditEvent) -> None:
        """Durably append ``event`` or raise :class:`UnavailableError` (and turn unready)."""
        start = time.perf_counter()
        try:
            await self._bounded(asyncio.ensure_future(self._write(event)))
        except Exception as exc:
            self._observe(time.perf_counter() - start, False)
            if isinstance(exc, _AuditTimeoutError):
                self._abandoned += 1
            self._failed(exc)
            # A fresh message: the sink's may name database internals.
            raise UnavailableError("the audit log cannot record this request") from None
        self._recovered()
        self._observe(time.perf_counter() - start, True)

    async def _bounded(self, write: asyncio.Future[None]) -> None:
        """Await ``write`` for at most the append timeout.

        Why: a store that hangs (a network partition, a stopped database
        server) is an outage as much as one that refuses, but without a
        deadline every request would wait for it indefinitely. The write
        itself is not cancelled (shielded): the record is already on its way
        to the store and may still commit, so a refused request can appear in
        the log (as with a commit that lands while the connection drops);
        an acknowledged one is always there.
        """
        write.add_done_callback(_retrieve)
        try:
            await asyncio.wait_for(asyncio.shield(write), self._append_timeout_s)
        except TimeoutError:
            raise _AuditTimeoutError(
                f"the audit store did not commit within {self._append_timeout_s:g} s"
            ) from None

    async def _write(self, item: AuditEvent | AuditRecord) -> None:
        if self._entry_async is not None:
            entry = item.entry() if isinstance(item, AuditEvent) else encode_record(item)
            await self._entry_async(entry)
            return
        record = item.record() if isinstance(item, AuditEvent) else item
        if self._async is not None:
            await self._async(record)
        else:
            await asyncio.to_thread(self._sink.append, record)

    def _failed(self, exc: Exception) -> None:
        if self.healthy:
            # The operator's clue is the class (OperationalError, OSError...); the
            # message may name database internals or quote the entry, so it stays out.
            # Once per outage: under load every request fails the same way.
            _log.error(
                "audit append failed (%s.%s); requests fail closed until it recovers",
                type(exc).__module__,
                type(exc).__qualname__,
            )
        self.healthy = False
        self._refused += 1
        if self._failing_since is None:
            self._failing_since = time.time()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_recovered())

    def _recovered(self) -> None:
        if not self.healthy:
            _log.warning("audit appends succeed again after %d refused request(s)", self._refused)
        self.healthy = True
        self._failing_since = None
        self._refused = 0
        self._abandoned = 0

    async def _probe_until_recovered(self) -> None:
        """Append a recovery record every interval until one is durable (or a request's was).

        A probe whose write is still pending (a hung store) is waited for
        again rather than followed by another: one outage, one record.
        """
        pending: asyncio.Future[None] | None = None
        while not self.healthy:
            await asyncio.sleep(self._probe_interval_s)
            if self.healthy or self._failing_since is None:
                return  # a request's append succeeded meanwhile
            if pending is None:
                pending = asyncio.ensure_future(self._write(self._recovery_record()))
            try:
                await self._bounded(pending)
            except Exception:
                if pending.done():
                    pending = None  # refused, not pending: the next probe is a new record
                continue
            self._recovered()

    def _recovery_record(self) -> AuditRecord:
        since = self._failing_since if self._failing_since is not None else time.time()
        return AuditRecord(
            time=datetime.now(UTC),
            actor="gateway",
            role="system",
            action="gateway:audit-recovered",
            resource=(
                "audit-log: appends failed since "
                f"{format_time(datetime.fromtimestamp(since, UTC))}, "
                f"{self._refused} request(s) refused"
                + (
                    f", {self._abandoned} of them at the audit timeout (their records may "
                    "have committed since, with the answer they would have had, not the 503 "
                    "the caller got)"
                    if self._abandoned
                    else ""
                )
            ),
            outcome="ok",
        )


class _AuditTimeoutError(UnavailableError):
    """The store did not answer within the append timeout (the write goes on)."""


def _retrieve(write: asyncio.Future[None]) -> None:
    """Consume a write's outcome, so an abandoned one that failed logs no asyncio warning."""
    if not write.cancelled():
        write.exception()
