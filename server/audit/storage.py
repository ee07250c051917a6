"""Where the audit log lives: one :class:`AuditStorage` protocol, two databases.

Why the Merkle bookkeeping happens inside ``append``: the entry rows, their
leaf hashes and every perfect subtree they complete are written in one
transaction, so the stored tree can never disagree with the stored entries —
after a crash there is nothing to repair, only a frontier of O(log n) nodes to
reload. Each ``append`` takes the database's write lock first and re-reads the
size, so several processes (gateway replicas on one PostgreSQL) may append to
one log without forking it.

Both implementations are append-only at the database level too (SQLite
triggers, PostgreSQL row and TRUNCATE triggers): not a defence against the
operator — who can drop a trigger — but against accidents; tampering by the
operator is what the signed checkpoints and the verifier catch.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from fedvault.database import (
    check_location,
    is_postgres_url,
    pg_connect_args,
    postgres_url,
    read_password,
    require_utf8,
)
from fedvault.database import db_reason as _pg_reason
from fedvault.errors import ConfigError, IntegrityError, UnavailableError
from fedvault.sqlite import append_only_triggers, connect, transaction
from server.audit.merkle import Frontier, NodeKey, leaf_hash

__all__ = ["AuditStorage", "PostgresStorage", "SQLiteStorage", "open_storage", "tables"]


# Called with the latest stored ``(size, note)`` (None: no checkpoint yet) inside
# save_checkpoint's transaction; raises to refuse the save.
CheckpointCheck = Callable[[tuple[int, str] | None], None]


@runtime_checkable
class AuditStorage(Protocol):
    """What the appender, the API and the checkpointer need from a database."""

    def append(self, entries: Sequence[bytes]) -> int:
        """Append ``entries`` in one durable transaction; return the first one's index."""
        ...

    def size(self) -> int:
        """Number of committed entries."""
        ...

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        """Stored ``(index, entry)`` rows with ``start <= index < end``, by index."""
        ...

    def nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        """Hashes of perfect subtrees; raises :class:`IntegrityError` if one is missing."""
        ...

    def save_checkpoint(
        self, size: int, note: str, *, check: CheckpointCheck | None = None
    ) -> None:
        """Keep a signed checkpoint (idempotent per size).

        ``check`` is called with the latest stored checkpoint inside the same
        write transaction, under the lock appends take; raising from it
        stores nothing. It makes "who signed last" and "store mine" one step,
        so two writers with different keys cannot both pass the check.
        """
        ...

    def latest_checkpoint(self) -> tuple[int, str] | None:
        """The largest stored checkpoint as ``(size, note)``."""
        ...

    def close(self) -> None: ...


def _plan(
    frontier: Frontier, entries: Sequence[bytes]
) -> tuple[list[tuple[int, bytes]], list[tuple[int, int, bytes]]]:
    """Rows for ``entries`` appended to ``frontier`` (mutated): entries, leaves and nodes.

    Leaf hashes live with the inner nodes, not beside the entry: an entry
    altered in place then disagrees with every proof the store serves, which
    is how the verifier pinpoints it.
    """
    entry_rows: list[tuple[int, bytes]] = []
    node_rows: list[tuple[int, int, bytes]] = []
    for entry in entries:
        index = frontier.size
        leaf = leaf_hash(entry)
        entry_rows.append((index, entry))
        node_rows.append((0, index, leaf))
        node_rows.extend((lvl, idx, h) for (lvl, idx), h in frontier.append(leaf))
    return entry_rows, node_rows


def _missing(keys: Sequence[NodeKey], found: dict[NodeKey, bytes]) -> dict[NodeKey, bytes]:
    if len(found) != len(set(keys)):
        gone = sorted(set(keys) - found.keys())[:3]
        raise IntegrityError(f"audit tree nodes missing from the store (e.g. {gone}): damaged")
    return found


# ----------------------------------------------------------------------- SQLite
_SQLITE_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS audit_entries (
        idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
    CREATE TABLE IF NOT EXISTS audit_nodes (
        level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
        PRIMARY KEY (level, idx)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS audit_checkpoints (
        size INTEGER PRIMARY KEY, note TEXT NOT NULL);
    """
    + append_only_triggers("audit_entries")
    + append_only_triggers("audit_nodes")
    + append_only_triggers("audit_checkpoints")
)


def stored_bytes(value: object) -> bytes:
    """A stored entry as bytes, whatever SQLite holds in its column.

    SQLite columns take any type: a row someone set to NULL, text or a number
    must read as *some* bytes, which then fail their leaf hash and are reported
    as an altered entry, not raise inside the integrity checks.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return b"" if value is None else repr(value).encode()


class SQLiteStorage:
    """The default store: one SQLite file in WAL mode with ``synchronous=FULL``.

    One writer connection behind a lock, a small pool of reader connections
    (WAL readers never wait for the writer), all opened through
    :func:`fedvault.sqlite.connect`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._write_lock = threading.Lock()
        self._writer = connect(path, check_same_thread=False)
        self._writer.executescript(_SQLITE_SCHEMA)
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all = [self._writer]
        self._all_lock = threading.Lock()
        self._frontier: Frontier | None = None
        self._closed = False

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise UnavailableError("audit store is closed")
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = connect(self.path, check_same_thread=False)
            with self._all_lock:
                self._all.append(conn)
        try:
            yield conn
        except sqlite3.Error as exc:
            raise UnavailableError(f"audit store read failed: {exc}") from None
        finally:
            self._readers.put(conn)

    def append(self, entries: Sequence[bytes]) -> int:
        if not entries:
            return self.size()
        with self._write_lock:
            if self._closed:
                raise UnavailableError("audit store is closed")
            conn = self._writer
            try:
                with transaction(conn):
                    size = _size(conn)
                    frontier = self._frontier
                    if frontier is None or frontier.size != size:  # first use, or another writer
                        frontier = _load_frontier(size, lambda k: _nodes(conn, k))
                    frontier = frontier.copy()
                    entry_rows, node_rows = _plan(frontier, entries)
                    conn.executemany("INSERT INTO audit_entries VALUES (?, ?)", entry_rows)
                    conn.executemany("INSERT INTO audit_nodes VALUES (?, ?, ?)", node_rows)
            except BaseException:
                self._frontier = None  # reloaded from what the store holds, next time
                raise
            self._frontier = frontier
            return size

    def size(self) -> int:
        with self._reader() as conn:
            return _size(conn)

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT idx, entry FROM audit_entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, end),
            ).fetchall()
        return [(int(r[0]), stored_bytes(r[1])) for r in rows]

    def nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        with self._reader() as conn:
            return _nodes(conn, keys)

    def save_checkpoint(
        self, size: int, note: str, *, check: CheckpointCheck | None = None
    ) -> None:
        with self._write_lock, transaction(self._writer):
            if check is not None:
                check(_latest(self._writer))
            self._writer.execute(
                "INSERT OR IGNORE INTO audit_checkpoints VALUES (?, ?)", (size, note)
            )

    def latest_checkpoint(self) -> tuple[int, str] | None:
        with self._reader() as conn:
            return _latest(conn)

    def close(self) -> None:
        with self._write_lock:
            self._closed = True
            with self._all_lock:
                for conn in self._all:
                    conn.close()
                self._all.clear()


def _latest(conn: sqlite3.Connection) -> tuple[int, str] | None:
    row = conn.execute(
        "SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1"
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def _size(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit_entries").fetchone()[0])


def _nodes(conn: sqlite3.Connection, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
    found: dict[NodeKey, bytes] = {}
    for key in keys:
        value = conn.execute(
            "SELECT hash FROM audit_nodes WHERE level = ? AND idx = ?", key
        ).fetchone()
        if value is not None:
            found[key] = bytes(value[0])
    return _missing(keys, found)


def _load_frontier(size: int, fetch: Any) -> Frontier:
    keys = Frontier.keys_for(size)
    return Frontier.from_nodes(size, fetch(keys) if keys else {})


# ------------------------------------------------------------------- PostgreSQL
_meta = sa.MetaData()
_entries = sa.Table(
    "audit_entries",
    _meta,
    sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("entry", sa.LargeBinary, nullable=False),
)
_nodes_t = sa.Table(
    "audit_nodes",
    _meta,
    sa.Column("level", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.LargeBinary, nullable=False),
)
_checkpoints = sa.Table(
    "audit_checkpoints",
    _meta,
    sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("note", sa.Text, nullable=False),
)
_PG_APPEND_ONLY = """
CREATE OR REPLACE FUNCTION fedvault_audit_append_only() RETURNS trigger AS $$
BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$ LANGUAGE plpgsql;
"""
_PG_LOCK_ID = 0x6665_6476_6175_6C74 & 0x7FFF_FFFF_FFFF_FFFF  # "fedvault"


def tables() -> list[sa.Table]:
    """The log's tables: entries, tree nodes, signed checkpoints.

    Declared for PostgreSQL; the SQLite DDL above has the same tables and
    columns, so these declarations read either. Public for copying a log
    between databases row for row (``fedvault store migrate``,
    :mod:`server.migrate`): re-appending the entries would re-derive the
    tree, whereas copying carries the stored tree and checkpoints as they
    are, to be compared with the source's afterwards.
    """
    return [_entries, _nodes_t, _checkpoints]


class PostgresStorage:
    """PostgreSQL through SQLAlchemy (``postgresql+psycopg://…``), for the scale path.

    Writers serialise on a transaction-scoped advisory lock; a commit returns
    only once PostgreSQL has flushed its WAL (``synchronous_commit`` on, the
    server default — do not turn it off for this database).
    """

    def __init__(self, url: str, *, password: str | None = None) -> None:
        try:
            self._engine = sa.create_engine(
                url, pool_pre_ping=True, pool_size=8, connect_args=pg_connect_args(password)
            )
            with self._engine.begin() as conn:
                require_utf8(conn, "audit", url)
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_ID})
                _meta.create_all(conn)
                conn.execute(sa.text(_PG_APPEND_ONLY))
                for table in ("audit_entries", "audit_nodes", "audit_checkpoints"):
                    conn.execute(
                        sa.text(
                            f"CREATE OR REPLACE TRIGGER {table}_append_only BEFORE UPDATE OR "
                            f"DELETE ON {table} FOR EACH ROW "
                            "EXECUTE FUNCTION fedvault_audit_append_only()"
                        )
                    )
                    conn.execute(
                        sa.text(
                            f"CREATE OR REPLACE TRIGGER {table}_no_truncate BEFORE TRUNCATE "
                            f"ON {table} FOR EACH STATEMENT "
                            "EXECUTE FUNCTION fedvault_audit_append_only()"
                        )
                    )
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise UnavailableError(f"cannot open the audit database: {_pg_reason(exc)}") from None
        except ConfigError:
            self._engine.dispose()
            raise
        self._write_lock = threading.Lock()
        self._frontier: Frontier | None = None

    def append(self, entries: Sequence[bytes]) -> int:
        if not entries:
            return self.size()
        with self._write_lock:
            try:
                with self._engine.begin() as conn:
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_ID})
                    size = _pg_size(conn)
                    frontier = self._frontier
                    if frontier is None or frontier.size != size:
                        frontier = _load_frontier(size, lambda k: _pg_nodes(conn, k))
                    frontier = frontier.copy()
                    entry_rows, node_rows = _plan(frontier, entries)
                    conn.execute(_entries.insert(), [{"idx": i, "entry": e} for i, e in entry_rows])
                    conn.execute(
                        _nodes_t.insert(),
                        [{"level": lv, "idx": i, "hash": h} for lv, i, h in node_rows],
                    )
            except SQLAlchemyError as exc:
                self._frontier = None
                raise UnavailableError(f"audit append failed: {_pg_reason(exc)}") from None
            except BaseException:
                self._frontier = None
                raise
            self._frontier = frontier
            return size

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        try:
            with self._engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise UnavailableError(f"audit store read failed: {_pg_reason(exc)}") from None

    def size(self) -> int:
        with self._read() as conn:
            return _pg_size(conn)

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        query = (
            sa.select(_entries.c.idx, _entries.c.entry)
            .where(_entries.c.idx >= start, _entries.c.idx < end)
            .order_by(_entries.c.idx)
        )
        with self._read() as conn:
            return [(int(i), bytes(e)) for i, e in conn.execute(query)]

    def nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        with self._read() as conn:
            return _pg_nodes(conn, keys)

    def save_checkpoint(
        self, size: int, note: str, *, check: CheckpointCheck | None = None
    ) -> None:
        from sqlalchemy.dialects.postgresql import insert

        try:
            with self._engine.begin() as conn:
                if check is not None:
                    # The appenders' lock: every writer of this log serialises on it.
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_ID})
                    check(_pg_latest(conn))
                conn.execute(
                    insert(_checkpoints)
                    .values(size=size, note=note)
                    .on_conflict_do_nothing(index_elements=["size"])
                )
        except SQLAlchemyError as exc:
            raise UnavailableError(f"cannot store checkpoint: {_pg_reason(exc)}") from None

    def latest_checkpoint(self) -> tuple[int, str] | None:
        with self._read() as conn:
            return _pg_latest(conn)

    def close(self) -> None:
        self._engine.dispose()


def _pg_latest(conn: sa.Connection) -> tuple[int, str] | None:
    query = sa.select(_checkpoints.c.size, _checkpoints.c.note)
    row = conn.execute(query.order_by(_checkpoints.c.size.desc()).limit(1)).first()
    return None if row is None else (int(row[0]), str(row[1]))


def _pg_size(conn: sa.Connection) -> int:
    value = conn.execute(sa.select(sa.func.coalesce(sa.func.max(_entries.c.idx) + 1, 0)))
    return int(value.scalar_one())


def _pg_nodes(conn: sa.Connection, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
    if not keys:
        return {}
    rows = conn.execute(
        sa.select(_nodes_t.c.level, _nodes_t.c.idx, _nodes_t.c.hash).where(
            sa.tuple_(_nodes_t.c.level, _nodes_t.c.idx).in_(list(keys))
        )
    )
    return _missing(keys, {(int(lv), int(i)): bytes(h) for lv, i, h in rows})


def open_storage(location: str | Path, *, password_file: Path | None = None) -> AuditStorage:
    """A ``postgresql…://`` URL opens PostgreSQL; anything else is a SQLite file path.

    ``password_file`` holds the PostgreSQL password (a mounted secret, e.g.
    a compose secret); it is read here and never put in the URL.
    """
    text = str(location)
    check_location(text, "audit database")
    if is_postgres_url(text):
        password = read_password(password_file, "audit database")
        return PostgresStorage(postgres_url(text), password=password)
    return SQLiteStorage(Path(text))
