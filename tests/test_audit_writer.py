"""The audit writer process: durable and ordered like the thread, fail closed when it dies."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedvault.errors import UnavailableError
from secure.signed_note import NoteSigner, generate_note_key
from server.audit import merkle
from server.audit.log import AuditLog
from server.audit.records import decode_entry
from server.audit.storage import SQLiteStorage
from server.audit.writer import ProcessCommitter
from tests.audit_support import append_concurrently, record

ORIGIN = "fedvault.test/audit-writer"


@pytest.fixture
def signer() -> NoteSigner:
    return generate_note_key(ORIGIN)


@pytest.fixture
def log(tmp_path: Path, signer: NoteSigner) -> Iterator[AuditLog]:
    db = tmp_path / "audit.db"
    audit = AuditLog(SQLiteStorage(db), signer, committer=ProcessCommitter(db))
    yield audit
    audit.close()


def _count(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM audit_entries").fetchone()[0])
    finally:
        conn.close()


def test_appends_are_durable_and_indexed(log: AuditLog, tmp_path: Path) -> None:
    assert [log.append(record(i)) for i in range(5)] == [0, 1, 2, 3, 4]
    assert _count(tmp_path / "audit.db") == 5  # acknowledged means committed
    assert decode_entry(log.entries(0, 10)[3][1]) == record(3)


def test_concurrent_appends_are_group_committed_in_one_tree(log: AuditLog) -> None:
    got = append_concurrently(log, threads=8, per_thread=25)
    assert sorted(got) == list(range(200))
    batches, items = log.group_commit_stats
    assert items == 200
    assert batches < 200
    entries = [e for _, e in log.entries(0, 200)]
    assert log.root(200) == merkle.reference_root([merkle.leaf_hash(e) for e in entries])
    assert log.verify_store() == 200


def test_async_appends_get_their_own_index(log: AuditLog) -> None:
    async def main() -> list[int]:
        return list(await asyncio.gather(*(log.append_async(record(i)) for i in range(50))))

    indexes = asyncio.run(main())
    assert sorted(indexes) == list(range(50))
    for i, idx in enumerate(indexes):  # each waiter got the index of *its* entry
        assert decode_entry(log.entries(idx, idx + 1)[0][1]) == record(i)


def test_thread_and_process_appenders_share_one_verifiable_log(
    tmp_path: Path, signer: NoteSigner
) -> None:
    """Two appenders on one store (e.g. REST and gRPC processes): one tree, one checkpoint."""
    db = tmp_path / "audit.db"
    by_process = AuditLog(SQLiteStorage(db), signer, committer=ProcessCommitter(db))
    by_thread = AuditLog(SQLiteStorage(db), signer)
    try:
        for i in range(20):
            (by_process if i % 2 else by_thread).append(record(i))
        by_thread.checkpoint(force=True)
        assert by_process.size() == by_thread.size() == 20
        assert by_process.verify_store() == 20
        entries = [e for _, e in by_thread.entries(0, 20)]
        assert by_process.root(20) == merkle.reference_root([merkle.leaf_hash(e) for e in entries])
        assert sorted(decode_entry(e).request_id or "" for e in entries) == sorted(
            f"req-{i}" for i in range(20)
        )
    finally:
        by_process.close()
        by_thread.close()
    reopened = AuditLog(SQLiteStorage(db), signer)  # its signed checkpoint still matches
    assert reopened.size() == 20
    reopened.close()


def test_a_failing_store_fails_the_batch_not_the_writer(tmp_path: Path, signer: NoteSigner) -> None:
    db = tmp_path / "audit.db"
    audit = AuditLog(SQLiteStorage(db), signer, committer=ProcessCommitter(db))
    try:
        assert audit.append(record(0)) == 0
        conn = sqlite3.connect(db)  # the store starts refusing appends (a stand-in for a full disk)
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_entries "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        conn.commit()
        with pytest.raises(UnavailableError):
            audit.append(record(1))
        conn.execute("DROP TRIGGER refuse")
        conn.commit()
        conn.close()
        assert audit.append(record(2)) == 1  # same child, next batch commits
    finally:
        audit.close()


def test_writer_death_fails_closed_then_recovers(tmp_path: Path, signer: NoteSigner) -> None:
    db = tmp_path / "audit.db"
    committer = ProcessCommitter(db)
    audit = AuditLog(SQLiteStorage(db), signer, committer=committer)
    try:
        assert audit.append(record(0)) == 0
        first = committer.pid
        os.kill(first, signal.SIGKILL)
        refused = 0
        index = None
        deadline = time.monotonic() + 20
        while index is None and time.monotonic() < deadline:
            try:
                index = audit.append(record(1))
            except UnavailableError:
                refused += 1  # in flight when it died, or within the restart pause
                time.sleep(0.05)
        assert index is not None  # a fresh writer process took over
        assert committer.pid != first
        assert committer.restarts == 1  # one spawn, however many appends were refused
        assert index == audit.size() - 1
        assert audit.verify_store() == audit.size()
    finally:
        audit.close()
    with pytest.raises(UnavailableError, match="closed"):
        audit.append(record(3))


def test_appends_right_after_a_death_fail_fast(tmp_path: Path, signer: NoteSigner) -> None:
    db = tmp_path / "audit.db"
    committer = ProcessCommitter(db)
    try:
        assert committer.submit(b"{}").result(10) == 0
        os.kill(committer.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while committer._child.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="restarting"):
            committer.submit(b"{}")
        assert time.monotonic() - t0 < 0.5  # no spawn, no wait
        assert committer.restarts == 0
    finally:
        committer.close()


def test_a_store_the_writer_cannot_open_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="could not open"):
        ProcessCommitter(tmp_path)  # a directory, not a database file


def test_close_commits_what_was_sent(tmp_path: Path, signer: NoteSigner) -> None:
    db = tmp_path / "audit.db"
    committer = ProcessCommitter(db)
    futures = [committer.submit(f'{{"n":{i}}}'.encode()) for i in range(100)]
    committer.close()
    assert sorted(f.result(5) for f in futures) == list(range(100))
    assert _count(db) == 100


def test_gateway_cli_picks_the_writer(tmp_path: Path) -> None:
    from fedvault.cli.gateway import audit_committer

    db = tmp_path / "audit.db"
    assert audit_committer("thread", db, None) is None  # AuditLog's own writer thread
    committer = audit_committer("process", db, None)
    try:
        assert isinstance(committer, ProcessCommitter)
        assert committer.submit(b'{"n":0}').result(10) == 0
    finally:
        assert committer is not None
        committer.close()


def test_writer_process_on_postgresql(pg_admin: str, signer: NoteSigner) -> None:
    """The child opens the same PostgreSQL store; the parent reads what it committed."""
    from server.audit.storage import open_storage
    from tests.audit_support import fresh_database

    url = fresh_database(pg_admin, "audit_writer_process")
    audit = AuditLog(open_storage(url), signer, committer=ProcessCommitter(url))
    try:
        assert [audit.append(record(i)) for i in range(10)] == list(range(10))
        assert audit.verify_store() == 10
        assert decode_entry(audit.entries(4, 5)[0][1]) == record(4)
    finally:
        audit.close()


def test_commit_delay_only_under_load() -> None:
    """Small batches right after a commit wait for company; an idle writer commits at once."""
    from server.audit.writer import BUSY_WINDOW_S, SMALL_BATCH, wait_for_more

    assert wait_for_more(1, 0.0005)  # busy: one entry, last commit 0.5 ms ago
    assert not wait_for_more(SMALL_BATCH, 0.0005)  # a real batch goes now
    assert not wait_for_more(1, BUSY_WINDOW_S * 2)  # idle: no added latency
    assert not wait_for_more(1, 10.0)


def test_a_stalled_writer_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """Entries beyond what the socket holds wait in memory; the loop keeps running."""
    db = tmp_path / "audit.db"
    committer = ProcessCommitter(db)
    entry = b'{"pad":"' + b"x" * 1000 + b'"}'
    try:
        os.kill(committer.pid, signal.SIGSTOP)  # a commit that takes forever

        async def main() -> tuple[float, list[int]]:
            futures = [committer.submit_async(entry) for _ in range(20000)]  # > the socket buffer
            worst = 0.0
            for _ in range(20):  # the loop stays responsive while nothing is written
                t0 = time.perf_counter()
                await asyncio.sleep(0.01)
                worst = max(worst, time.perf_counter() - t0)
            assert not any(f.done() for f in futures)  # nothing acknowledged: not durable
            os.kill(committer.pid, signal.SIGCONT)
            return worst, list(await asyncio.wait_for(asyncio.gather(*futures), 60))

        worst, indexes = asyncio.run(main())
        assert worst < 0.5
        assert indexes == list(range(20000))
    finally:
        os.kill(committer.pid, signal.SIGCONT)
        committer.close()
    assert _count(db) == 20000


def test_a_thread_waits_for_a_stalled_writer_without_losing_order(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    committer = ProcessCommitter(db)
    entry = b'{"pad":"' + b"x" * 1000 + b'"}'
    try:
        os.kill(committer.pid, signal.SIGSTOP)
        threading.Timer(0.3, os.kill, (committer.pid, signal.SIGCONT)).start()
        futures = [committer.submit(entry) for _ in range(20000)]  # blocks once the socket is full
        assert [f.result(60) for f in futures] == list(range(20000))
    finally:
        os.kill(committer.pid, signal.SIGCONT)
        committer.close()
