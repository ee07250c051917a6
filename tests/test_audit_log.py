"""The appender and checkpointer: durability, group commit, rate limit, fail-closed start."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from fedvault.errors import IntegrityError, InvalidRequestError, UnavailableError
from secure.signed_note import NoteSigner, generate_note_key, open_note, parse_checkpoint
from server.audit import merkle
from server.audit.log import AuditLog, AuditSink
from server.audit.records import AuditRecord, InvalidEntry, decode_entry, encode_record
from server.audit.storage import SQLiteStorage
from tests.audit_support import append_concurrently, record

ORIGIN = "fedvault.test/audit"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def signer() -> NoteSigner:
    return generate_note_key(ORIGIN)


@pytest.fixture
def log(tmp_path: Path, signer: NoteSigner) -> Iterator[AuditLog]:
    audit = AuditLog(SQLiteStorage(tmp_path / "audit.db"), signer)
    yield audit
    audit.close()


def test_canonical_record_bytes() -> None:
    r = record(
        1,
        time=datetime(2026, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1))),
        actor="zoë",
        epsilon_charged=0.25,
        run_id="run-1",
        round=2,
        partner="alpha",
    )
    b = encode_record(r)
    assert (
        b
        == (
            '{"action":"infer","actor":"zoë","epsilon_charged":0.25,"outcome":"ok",'
            '"partner":"alpha","request_id":"req-1","resource":"models/m1","role":"analyst",'
            '"round":2,"run_id":"run-1","time":"2026-01-02T03:04:05.000000Z"}'
        ).encode()
    )
    assert decode_entry(b) == r
    with pytest.raises(InvalidEntry, match="canonical"):
        decode_entry(b.replace(b'{"action"', b'{ "action"'))
    with pytest.raises(InvalidEntry, match="actor"):
        decode_entry(b.replace(b'"zo\xc3\xab"', b'""'))
    with pytest.raises(ValueError, match="timezone"):
        record(1, time=datetime(2026, 1, 1))  # naive times are refused


# An entry as the gateway wrote it before the request fields were typed (values
# packed into actor/outcome text): its bytes and leaf hash must never change.
_OLD_GATEWAY_ENTRY = (
    '{"action":"rest:infer","actor":"key:0123456789ab peer=127.0.0.1:5555",'
    '"outcome":"status=200 error=- latency_ms=1.250","request_digest":"' + "a" * 64 + '",'
    '"request_id":"req-1","resource":"model:m/2","response_digest":"' + "b" * 64 + '",'
    '"role":"analyst","time":"2026-01-02T03:04:05.000000Z"}'
).encode()


def test_entries_written_before_request_fields_keep_their_bytes() -> None:
    old = decode_entry(_OLD_GATEWAY_ENTRY)
    assert (old.protocol, old.peer, old.status, old.latency_ms) == (None, None, None, None)
    assert encode_record(old) == _OLD_GATEWAY_ENTRY
    assert merkle.leaf_hash(encode_record(old)).hex() == (
        "8b83ca8f5da6ec3c6631afb364379b8cf112c1755692a9334ed660ce7ec0fafd"
    )


def test_request_fields_are_canonical() -> None:
    r = record(
        1,
        protocol="grpc",
        peer="ipv4:127.0.0.1:5555",
        mtls_subject="CN=app",
        status="INVALID_ARGUMENT",
        error_type="urn:fedvault:problem:config",
        latency_ms=12.345,
    )
    b = encode_record(r)
    assert b'"latency_ms":12.345,' in b
    assert b'"mtls_subject":"CN=app","outcome"' in b
    assert decode_entry(b) == r
    with pytest.raises(InvalidEntry, match="canonical"):
        decode_entry(b.replace(b"12.345", b"12.3450"))
    with pytest.raises(InvalidEntry, match="latency_ms"):
        decode_entry(b.replace(b"12.345", b"-1.0"))
    with pytest.raises(ValueError, match="finite"):
        record(1, latency_ms=float("inf"))


def test_append_is_durable_and_indexed(log: AuditLog, tmp_path: Path, signer: NoteSigner) -> None:
    assert isinstance(log, AuditSink)
    assert [log.append(record(i)) for i in range(5)] == [0, 1, 2, 3, 4]
    # Durable: a separate connection sees the rows without any further step.
    conn = sqlite3.connect(tmp_path / "audit.db")
    assert conn.execute("SELECT COUNT(*) FROM audit_entries").fetchone()[0] == 5
    conn.close()
    assert decode_entry(log.entries(0, 10)[3][1]) == record(3)


def test_concurrent_appends_are_group_committed(log: AuditLog) -> None:
    got = append_concurrently(log, threads=16, per_thread=25)
    assert sorted(got) == list(range(400))
    batches, items = log.group_commit_stats
    assert items == 400
    assert batches < 400
    entries = [e for _, e in log.entries(0, 400)]
    assert log.root(400) == merkle.reference_root([merkle.leaf_hash(e) for e in entries])


def test_async_appends(log: AuditLog) -> None:
    async def main() -> list[int]:
        return list(await asyncio.gather(*(log.append_async(record(i)) for i in range(50))))

    assert sorted(asyncio.run(main())) == list(range(50))


def test_storage_failure_fails_every_waiter(tmp_path: Path, signer: NoteSigner) -> None:
    class Broken(SQLiteStorage):
        def append(self, entries: Sequence[bytes]) -> int:
            raise UnavailableError("disk full")

    audit = AuditLog(Broken(tmp_path / "b.db"), signer)
    try:
        with pytest.raises(UnavailableError, match="disk full"):
            audit.append(record(0))
    finally:
        audit.close()
    with pytest.raises(UnavailableError):
        audit.append(record(1))  # closed logs refuse, they do not drop


def test_checkpoints_rate_limited_and_on_demand(tmp_path: Path, signer: NoteSigner) -> None:
    clock = Clock()
    audit = AuditLog(SQLiteStorage(tmp_path / "a.db"), signer, clock=clock)
    try:
        first = parse_checkpoint(open_note(audit.checkpoint(), signer.verifier))
        assert (first.origin, first.size, first.root) == (ORIGIN, 0, merkle.EMPTY_ROOT)
        audit.append(record(0))
        clock.now += 0.5
        assert parse_checkpoint(open_note(audit.checkpoint(), signer.verifier)).size == 0
        assert parse_checkpoint(open_note(audit.checkpoint(force=True), signer.verifier)).size == 1
        audit.append(record(1))
        clock.now += 0.2
        assert parse_checkpoint(open_note(audit.checkpoint(), signer.verifier)).size == 1
        clock.now += 1.0
        cp = parse_checkpoint(open_note(audit.checkpoint(), signer.verifier))
        assert cp.size == 2
        assert cp.root == audit.root(2)
        assert audit.storage.latest_checkpoint() is not None
    finally:
        audit.close()


def test_background_checkpointing(tmp_path: Path, signer: NoteSigner) -> None:
    audit = AuditLog(SQLiteStorage(tmp_path / "a.db"), signer, checkpoint_interval=0.05)
    try:
        audit.start_checkpointing()
        audit.append(record(0))
        for _ in range(100):
            stored = audit.storage.latest_checkpoint()
            if stored and stored[0] == 1:
                break
            threading.Event().wait(0.02)
        assert stored is not None
        assert stored[0] == 1
    finally:
        audit.close()


def test_proof_parameters_are_checked(log: AuditLog) -> None:
    for i in range(6):
        log.append(record(i))
    with pytest.raises(InvalidRequestError):
        log.inclusion_proof(6, 6)
    with pytest.raises(InvalidRequestError):
        log.inclusion_proof(1, 7)
    with pytest.raises(InvalidRequestError):
        log.consistency_proof(0, 3)
    with pytest.raises(InvalidRequestError):
        log.consistency_proof(4, 3)
    with pytest.raises(InvalidRequestError):
        log.entries(7, 8)
    assert log.entries(6, 9) == []
    assert len(log.entries(0, 10_000)) == 6


def _reopen(path: Path, signer: NoteSigner) -> AuditLog:
    return AuditLog(SQLiteStorage(path), signer)


def test_restart_rebuilds_and_stays_consistent(tmp_path: Path, signer: NoteSigner) -> None:
    path = tmp_path / "a.db"
    audit = _reopen(path, signer)
    for i in range(9):
        audit.append(record(i))
    old = parse_checkpoint(open_note(audit.checkpoint(force=True), signer.verifier))
    audit.close()
    audit = _reopen(path, signer)
    try:
        audit.append(record(9))
        new = parse_checkpoint(open_note(audit.checkpoint(force=True), signer.verifier))
        assert new.size == 10
        proof = audit.consistency_proof(old.size, new.size)
        merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)
        assert audit.verify_store() == 10
    finally:
        audit.close()


def _tamper(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER audit_entries_no_update")
    conn.execute("DROP TRIGGER audit_entries_no_delete")
    conn.execute("DROP TRIGGER audit_nodes_no_update")
    conn.execute("DROP TRIGGER audit_nodes_no_delete")
    for statement in statements:
        conn.execute(statement)
    conn.close()


def test_start_refuses_a_store_that_lost_entries(tmp_path: Path, signer: NoteSigner) -> None:
    path = tmp_path / "a.db"
    audit = _reopen(path, signer)
    for i in range(5):
        audit.append(record(i))
    audit.checkpoint(force=True)
    audit.close()
    _tamper(path, "DELETE FROM audit_entries WHERE idx = 4")
    with pytest.raises(IntegrityError, match="lost"):
        _reopen(path, signer)


def test_start_refuses_a_rewritten_tree(tmp_path: Path, signer: NoteSigner) -> None:
    path = tmp_path / "a.db"
    audit = _reopen(path, signer)
    for i in range(4):
        audit.append(record(i))
    audit.checkpoint(force=True)
    audit.close()
    _tamper(path, "UPDATE audit_nodes SET hash = zeroblob(32) WHERE level = 2")
    with pytest.raises(IntegrityError, match="does not match"):
        _reopen(path, signer)


def test_verify_store_names_a_changed_entry(tmp_path: Path, signer: NoteSigner) -> None:
    path = tmp_path / "a.db"
    audit = _reopen(path, signer)
    for i in range(7):
        audit.append(record(i))
    audit.close()
    _tamper(path, "UPDATE audit_entries SET entry = CAST('{}' AS BLOB) WHERE idx = 3")
    audit = _reopen(path, signer)
    try:
        with pytest.raises(IntegrityError, match="entry 3"):
            audit.verify_store()
    finally:
        audit.close()


def test_record_is_frozen() -> None:
    r: AuditRecord = record(0)
    with pytest.raises(ValueError, match="frozen"):
        r.actor = "mallory"  # type: ignore[misc]
