"""The audit record and its canonical bytes: what a leaf of the log commits to.

Why canonical JSON: an auditor re-derives each leaf hash from the bytes the
API returns, and anyone re-encoding a record (another language, another JSON
library) must get the same bytes. So: keys sorted, no insignificant
whitespace, UTF-8 (not ASCII escapes), absent optional fields omitted rather
than ``null``, times as RFC 3339 UTC with microseconds and ``Z``, and floats in
their shortest round-trip form. :func:`decode_entry` accepts only bytes that
re-encode to themselves, so two spellings of one record cannot both appear.
The record carries no index: its position is the tree's business.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "AuditRecord",
    "InvalidEntry",
    "canonical_bytes",
    "decode_entry",
    "encode_record",
    "format_time",
]

Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""Hex SHA-256 of a request or response body (the bodies themselves stay out of the log)."""
Name = Annotated[str, Field(min_length=1, max_length=512)]
Short = Annotated[str, Field(min_length=1, max_length=32)]
"""A protocol name (``rest``, ``grpc``) or a status (HTTP ``"200"``, gRPC ``"OK"``)."""


class InvalidEntry(ValueError):
    """Entry bytes are not a canonical audit record (a plain error: this module is pure)."""


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with a fixed six-digit fraction, so equal instants encode equally."""
    utc = value.astimezone(UTC)
    if utc.year >= 1000:  # isoformat is ~3x faster than strftime and, here, the same text
        return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditRecord(BaseModel):
    """One decision or outcome: who did what to which resource, and how it ended."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    time: datetime
    actor: Name
    role: Name
    action: Name
    resource: Name
    outcome: Name
    request_id: Name | None = None
    request_digest: Digest | None = None
    response_digest: Digest | None = None
    # Training events (coordinator): which run, round and partner, and the ε charged.
    run_id: Name | None = None
    round: int | None = Field(default=None, ge=0)
    partner: Name | None = None
    epsilon_charged: float | None = Field(default=None, ge=0)
    # Request events (gateway): how the call arrived and how it ended. Optional and
    # omitted when unset, so entries written before these fields existed keep their
    # exact bytes (and leaf hashes).
    protocol: Short | None = None
    peer: Name | None = None
    mtls_subject: Name | None = None
    status: Short | None = None
    error_type: Name | None = None
    latency_ms: float | None = Field(default=None, ge=0)

    @field_validator("time")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("time must carry a timezone (UTC is stored)")
        return value.astimezone(UTC)

    @field_validator("epsilon_charged", "latency_ms")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    def to_json_dict(self) -> dict[str, Any]:
        """The canonical field set: set values only, time as RFC 3339 text."""
        out: dict[str, Any] = {}
        for key, value in self.model_dump(exclude_none=True).items():
            out[key] = format_time(value) if key == "time" else value
        return out


def encode_record(record: AuditRecord) -> bytes:
    """Canonical bytes of ``record``: the leaf is SHA-256(0x00 ‖ these bytes)."""
    return canonical_bytes(record.to_json_dict())


def canonical_bytes(fields: dict[str, Any]) -> bytes:
    """Canonical bytes of a record's JSON field set (:meth:`AuditRecord.to_json_dict`'s form)."""
    return _CANONICAL.encode(fields).encode("utf-8")


_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
"""One encoder for every record (``json.dumps`` with options builds a new one per call)."""


def decode_entry(entry: bytes) -> AuditRecord:
    """Parse entry bytes, accepting only the canonical encoding of a valid record."""
    try:
        record = AuditRecord.model_validate_json(entry)
    except ValidationError as exc:
        fields = ", ".join(str(e["loc"][0]) for e in exc.errors() if e["loc"]) or "json"
        raise InvalidEntry(f"not a valid audit record (bad: {fields})") from None
    if encode_record(record) != entry:
        raise InvalidEntry("not in canonical form (re-encoding gives different bytes)")
    return record
