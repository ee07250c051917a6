"""One contract for every audit store: SQLite and a real PostgreSQL pass the same tests."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedvault.errors import IntegrityError, UnavailableError
from server.audit import merkle
from server.audit.storage import AuditStorage, PostgresStorage, SQLiteStorage, open_storage
from tests.audit_support import fresh_database

_counter = itertools.count()


@dataclass
class Backend:
    name: str
    open: Callable[[], AuditStorage]
    sql: Callable[[str], None]  # raw statement, as the operator could run it


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "audit.db"

        def sqlite_sql(statement: str) -> None:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute(statement)
            finally:
                conn.close()

        return Backend("sqlite", lambda: SQLiteStorage(path), sqlite_sql)
    admin = request.getfixturevalue("pg_admin")
    url = fresh_database(admin, f"audit_{next(_counter)}")

    def pg_sql(statement: str) -> None:
        import psycopg

        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(statement.encode())

    return Backend("postgres", lambda: open_storage(url), pg_sql)


@pytest.fixture
def store(backend: Backend) -> Iterator[AuditStorage]:
    s = backend.open()
    yield s
    s.close()


def _leaves(n: int) -> list[bytes]:
    return [f'{{"n":{i}}}'.encode() for i in range(n)]


def test_empty_store(store: AuditStorage) -> None:
    assert isinstance(store, AuditStorage)
    assert store.size() == 0
    assert store.entries(0, 10) == []
    assert store.latest_checkpoint() is None
    assert store.nodes([]) == {}


def test_append_assigns_consecutive_indices(store: AuditStorage) -> None:
    data = _leaves(10)
    assert store.append(data[:3]) == 0
    assert store.append(data[3:4]) == 3
    assert store.append(data[4:]) == 4
    assert store.size() == 10
    assert store.entries(0, 100) == list(enumerate(data))
    assert store.entries(7, 9) == [(7, data[7]), (8, data[8])]


def test_stored_nodes_give_the_rfc_root_at_every_size(store: AuditStorage) -> None:
    data = _leaves(37)
    hashes = [merkle.leaf_hash(d) for d in data]
    for lo, hi in ((0, 1), (1, 2), (2, 9), (9, 10), (10, 33), (33, 37)):
        store.append(data[lo:hi])
    for n in range(38):
        keys = merkle.Frontier.keys_for(n)
        assert merkle.root_from_nodes(n, store.nodes(keys)) == merkle.reference_root(hashes[:n])
    for i in range(0, 37, 5):
        proof = merkle.inclusion_proof(i, 37, store.nodes)
        merkle.verify_inclusion(i, 37, hashes[i], proof, merkle.reference_root(hashes))


def test_missing_nodes_are_integrity_errors(store: AuditStorage) -> None:
    store.append(_leaves(4))
    with pytest.raises(IntegrityError):
        store.nodes([(0, 4)])
    with pytest.raises(IntegrityError):
        store.nodes([(3, 0)])


def test_checkpoints_are_kept_and_idempotent(store: AuditStorage) -> None:
    store.save_checkpoint(0, "zero\n")
    store.save_checkpoint(5, "five\n")
    store.save_checkpoint(5, "five\n")
    store.save_checkpoint(3, "three\n")
    assert store.latest_checkpoint() == (5, "five\n")


def test_entries_survive_reopening(backend: Backend) -> None:
    first = backend.open()
    first.append(_leaves(21))
    root = merkle.root_from_nodes(21, first.nodes(merkle.Frontier.keys_for(21)))
    first.close()
    again = backend.open()
    try:
        assert again.size() == 21
        assert again.append([b"more"]) == 21
        hashes = [merkle.leaf_hash(d) for d in [*_leaves(21), b"more"]]
        got = merkle.root_from_nodes(22, again.nodes(merkle.Frontier.keys_for(22)))
        assert got == merkle.reference_root(hashes)
        assert merkle.root_from_nodes(21, again.nodes(merkle.Frontier.keys_for(21))) == root
    finally:
        again.close()


def test_two_writers_on_one_database_do_not_fork(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    try:
        expected: list[bytes] = []
        for i in range(12):
            writer = a if i % 3 else b
            batch = [f"w{i}-{j}".encode() for j in range(i % 4 + 1)]
            writer.append(batch)
            expected.extend(batch)
        assert [e for _, e in a.entries(0, 1000)] == expected
        n = len(expected)
        got = merkle.root_from_nodes(n, b.nodes(merkle.Frontier.keys_for(n)))
        assert got == merkle.reference_root([merkle.leaf_hash(e) for e in expected])
    finally:
        a.close()
        b.close()


def test_concurrent_appends_from_threads(store: AuditStorage) -> None:
    def work(t: int) -> None:
        for j in range(10):
            store.append([f"t{t}-{j}".encode()])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = store.entries(0, 100)
    assert [i for i, _ in rows] == list(range(40))
    assert len({e for _, e in rows}) == 40
    hashes = [merkle.leaf_hash(e) for _, e in rows]
    got = merkle.root_from_nodes(40, store.nodes(merkle.Frontier.keys_for(40)))
    assert got == merkle.reference_root(hashes)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_entries SET entry = entry WHERE idx = 1",
        "DELETE FROM audit_entries WHERE idx = 1",
        "DELETE FROM audit_nodes",
        "UPDATE audit_checkpoints SET note = 'x'",
    ],
)
def test_tables_are_append_only(backend: Backend, statement: str) -> None:
    s = backend.open()
    try:
        s.append(_leaves(4))
        s.save_checkpoint(4, "four\n")
    finally:
        s.close()
    with pytest.raises(Exception, match="append-only"):
        backend.sql(statement)


def test_closed_store_refuses(backend: Backend) -> None:
    s = backend.open()
    s.close()
    if isinstance(s, SQLiteStorage):
        with pytest.raises(UnavailableError):
            s.append([b"x"])


def test_rogue_row_makes_the_next_append_fail_closed(tmp_path: Path) -> None:
    s = SQLiteStorage(tmp_path / "a.db")
    try:
        s.append([b"a"])
        conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
        conn.execute("INSERT INTO audit_entries VALUES (1, x'00')")  # behind our back
        conn.close()
        # The writer re-reads the size, finds no tree for the rogue row, refuses.
        with pytest.raises(IntegrityError):
            s.append([b"b"])
        assert s.size() == 2
    finally:
        s.close()


def test_open_storage_picks_the_backend(tmp_path: Path) -> None:
    s = open_storage(tmp_path / "x.db")
    assert isinstance(s, SQLiteStorage)
    s.close()
    with pytest.raises(UnavailableError):
        PostgresStorage("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
