"""SQLite connections configured for durability, shared by every local store.

WAL with ``synchronous=FULL``: a committed transaction survives power loss and
``kill -9``; readers never block the single writer.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedvault.errors import ConfigError, ConflictError, UnavailableError


def connect(path: Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open (creating parents) a durable, autocommit-off connection.

    ``check_same_thread=False`` is for stores that pool connections across
    threads and serialise each connection's use themselves.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a directory should be, no permission: the setup's
        if path.parent.exists() and not path.parent.is_dir():
            raise ConfigError(f"{path.parent} is a file, not a directory") from None
        raise ConfigError(f"cannot create {path.parent}: {exc.strerror}") from None
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(
            path, timeout=30, isolation_level=None, check_same_thread=check_same_thread
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
    except (sqlite3.Error, OSError) as exc:
        if conn is not None:
            conn.close()
        raise _open_error(path, exc) from None
    conn.row_factory = sqlite3.Row
    return conn


def _open_error(path: Path, exc: BaseException) -> ConfigError | UnavailableError:
    """Why a store could not be opened: the setup's mistake (exit 2) or an outage (exit 10)."""
    if "file is not a database" in str(exc):  # a wrong path, or a damaged file
        return ConfigError(f"{path} is not a SQLite database")
    # A read-only copy (an evidence snapshot, a read-only mount): WAL mode
    # writes its index (-shm) beside the database even to read, so SQLite
    # cannot open it. Retrying will not help; a writable copy will.
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return ConfigError(
            f"cannot open {path}: it or its directory is read-only, and SQLite writes its "
            "write-ahead index beside the database even to read; use a writable copy"
        )
    return UnavailableError(f"cannot open database {path}: {exc}")


def append_only_trigger_statements(table: str) -> list[str]:
    """The statements that make ``table`` reject UPDATE and DELETE (an append-only ledger)."""
    return [
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{event.lower()} BEFORE {event} ON {table}\n"
        f"    BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        for event in ("UPDATE", "DELETE")
    ]


def append_only_triggers(table: str) -> str:
    """:func:`append_only_trigger_statements` as one script (for ``executescript``)."""
    return "".join(f"\n    {statement};" for statement in append_only_trigger_statements(table))


CHARGE_COLUMNS = (
    "run_id TEXT NOT NULL, round INTEGER NOT NULL, mechanism TEXT NOT NULL, "
    "noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL, "
    "max_grad_norm REAL NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL, "
    "accountant_version TEXT NOT NULL, epsilon_after REAL NOT NULL"
)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception.

    SQLite's own errors are translated here, once for every store: a violated
    constraint (a duplicate charge, run or model) is a :class:`ConflictError`,
    anything else from the database an :class:`UnavailableError` — at
    ``BEGIN`` (locked), inside, and at ``COMMIT`` (a full disk or an I/O error
    surfaces there). A ``ROLLBACK`` that finds no transaction (SQLite may
    have rolled back itself) never hides the error that ended it.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise _translated(exc) from None
    try:
        yield
    except BaseException as exc:
        _rollback(conn)
        if isinstance(exc, sqlite3.Error):
            raise _translated(exc) from None
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        _rollback(conn)
        raise _translated(exc) from None


def _translated(exc: sqlite3.Error) -> ConflictError | UnavailableError:
    if isinstance(exc, sqlite3.IntegrityError):
        return ConflictError(f"database constraint violated: {exc}")
    return UnavailableError(f"database error: {exc}")


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # already rolled back by SQLite
            conn.execute("ROLLBACK")
