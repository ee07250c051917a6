"""``AuditEvent.entry()`` (the gateway's fast path) writes exactly the model's canonical bytes."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from secure.signed_note import generate_note_key
from server.audit.log import AuditLog
from server.audit.records import decode_entry, encode_record
from server.audit.storage import SQLiteStorage
from server.gateway.audit import AuditEvent, AuditGate

text = st.text(min_size=0, max_size=600)
maybe_text = st.none() | text
digest = st.none() | st.text("0123456789abcdef", min_size=64, max_size=64) | text


@st.composite
def events(draw: st.DrawFn) -> AuditEvent:
    return AuditEvent(
        protocol=draw(st.sampled_from(["rest", "grpc"]) | st.text(min_size=0, max_size=40)),
        endpoint=draw(text),
        resource=draw(text),
        started=draw(st.floats(min_value=0, max_value=4e9)),
        key_id=draw(maybe_text),
        role=draw(maybe_text),
        peer=draw(maybe_text),
        mtls_subject=draw(maybe_text),
        model=draw(maybe_text),
        version=draw(maybe_text),
        status=draw(st.sampled_from(["200", "404", "OK", "UNAUTHENTICATED", ""]) | text),
        error_type=draw(maybe_text),
        latency_s=draw(st.floats(allow_nan=True, allow_infinity=True)),
        request_id=draw(maybe_text),
        request_digest=draw(digest),
        response_digest=draw(digest),
    )


@settings(max_examples=400, deadline=None)
@given(events())
def test_entry_is_the_records_canonical_bytes(event: AuditEvent) -> None:
    try:
        expected = encode_record(event.record())
    except (ValidationError, ValueError):
        with pytest.raises((ValidationError, ValueError)):
            event.entry()  # what the model refuses, the fast path refuses too
        return
    got = event.entry()
    assert got == expected
    assert encode_record(decode_entry(got)) == got  # and it reads back as canonical


def test_typical_gateway_event_takes_the_fast_path() -> None:
    event = AuditEvent(
        "rest",
        "infer",
        "/v2/models/m/infer",
        1_780_000_000.123456,
        key_id="k1",
        role="analyst",
        peer="127.0.0.1:5000",
        model="m",
        version="2",
        status="200",
        latency_s=0.0012345,
        request_id="req-1",
        request_digest="a" * 64,
        response_digest="b" * 64,
    )
    assert event.entry() == encode_record(event.record())
    assert math.isfinite(decode_entry(event.entry()).latency_ms or 0)


def test_gate_appends_entries_to_an_audit_log(tmp_path: Path) -> None:
    log = AuditLog(SQLiteStorage(tmp_path / "a.db"), generate_note_key("t/gate"))
    try:
        gate = AuditGate(log)
        event = AuditEvent("grpc", "ModelInfer", "/x", 1_780_000_000.0, status="OK", key_id="k")
        asyncio.run(gate.append(event))
        ((_, entry),) = log.entries(0, 1)
        assert entry == encode_record(event.record())
        assert gate.healthy
    finally:
        log.close()
