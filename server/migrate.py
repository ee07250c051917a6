"""Moving a HOME's SQLite stores to PostgreSQL (``fedvault store migrate``).

Why a tool rather than a fresh start: the federation's privacy ledger is
append-only and is how the coordinator knows each partner's ε spent — an
empty PostgreSQL would forget it; the audit log is evidence whose signed
checkpoints auditors already hold, so it must arrive with the same entries
and the same tree; models must keep loading (on PostgreSQL the sealed
artifact lives in its ``models`` row, not in ``HOME/registry``); and API keys
can only be copied, never re-issued, since only their slow hashes exist.

How, per store, with the store's own table declarations:

1. *Plan* (all that ``--dry-run`` does), for every store before anything is
   written to any. The source is ``HOME``'s file (a store without one is
   skipped; no source at all is an error). It is opened without being
   created or changed and its write lock is taken (``BEGIN IMMEDIATE``,
   then ``query_only``) and held until the whole migration ends, so a
   coordinator or gateway still running waits (and fails after its busy
   timeout) instead of writing rows the copy would miss, and plan and copy
   read one snapshot. Every row of every table is read through the checks
   the copy applies — each value of its column's type, no NUL character in
   text, no NULL in a key or NOT NULL column, integers within the
   PostgreSQL type, no dangling foreign key, every model's artifact and
   every training checkpoint equal to its recorded SHA-256 — and the source
   may hold no table or column this release does not declare. The source
   audit log verifies (:meth:`~server.audit.log.AuditLog.verify_store`,
   its latest checkpoint against the key). The destination is a UTF8
   database holding no data — its tables are missing, or empty but for the
   rows the schema itself writes (the gateway's revocation counter at 0).
2. *Copy*, store by store: the normal store class opens the destination (so
   the schema is the store's own), then one transaction locks its tables
   against writers, checks again that they are empty, inserts every row with
   its primary key (the ledger's ``seq`` included), puts each artifact file
   into its row, moves the identity sequences past the copied keys (and past
   SQLite's AUTOINCREMENT counter, so no ``seq`` is ever reused), and reads
   everything back: row counts and a digest of each table's content must
   equal what the plan read, and for the audit log the tree's root at the
   latest checkpoint must equal the source's and its note must open with
   the log's key. Anything else rolls the store back.
3. After the commit, the copied audit log is opened as a gateway opens it
   (its latest checkpoint checked against the tree and the key) and rehashed
   entry by entry.

Not idempotent on purpose: a copied store's destination holds data, so a
second run refuses it (unset that store's setting to skip it).
"""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from fedvault.database import Database, db_reason, describe, is_postgres_url, open_database
from fedvault.errors import (
    ConfigError,
    ConflictError,
    FedvaultError,
    IntegrityError,
    NotFoundError,
    SigningKeyMismatchError,
    UnavailableError,
)

if TYPE_CHECKING:
    from fedvault.settings import FedvaultSettings
    from secure.signed_note import NoteSigner
    from server.audit.merkle import NodeKey
    from server.audit.storage import CheckpointCheck

__all__ = ["StoreReport", "StoreSpec", "drop_statement", "migrate_home", "store_specs"]

BATCH: Final = 1000
"""Rows at most per insert and per fetch."""
BATCH_BYTES: Final = 8 * 2**20
"""Bytes of values at most per insert and per fetch (a batch holds at least one
row): tables of sealed artifacts or checkpoint states move a few rows at a time."""
LOCK_TIMEOUT_S: Final = 30.0
"""How long to wait for a source's write lock while a writer holds it."""
_MOD: Final = 2**256


class _Closeable(Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """One store to move: its SQLite source, its destination and its own tables."""

    name: str  # federation, gateway, audit
    setting: str  # the environment variable naming the destination
    source: Path
    destination: str | None
    password_file: Path | None
    tables: tuple[sa.Table, ...]
    open_store: Callable[[str, Path | None], _Closeable]  # the normal store class


@dataclass
class StoreReport:
    """What happened to one store (or would, with ``--dry-run``)."""

    store: str
    setting: str
    source: str
    destination: str | None = None  # host and database only, never credentials
    # skipped | would migrate | migrated | failed | failed after commit | not migrated
    status: str = "skipped"
    reason: str = ""  # why skipped
    rows: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""  # why it failed

    def to_json(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "setting": self.setting,
            "source": self.source,
            "destination": self.destination,
            "status": self.status,
            "reason": self.reason,
            "rows": dict(self.rows),
            "notes": list(self.notes),
            "error": self.error,
        }


def _open_federation(location: str, password_file: Path | None) -> _Closeable:
    from server.store import FederationStore

    return FederationStore(location, password_file=password_file)


def _open_gateway(location: str, password_file: Path | None) -> _Closeable:
    from server.gateway.keys import GatewayStore

    return GatewayStore(location, password_file=password_file)


def _open_audit(location: str, password_file: Path | None) -> _Closeable:
    from server.audit.storage import open_storage

    return open_storage(location, password_file=password_file)


def store_specs(settings: FedvaultSettings) -> list[StoreSpec]:
    """HOME's three SQLite stores and the destinations the settings name."""
    from server import store
    from server.audit import storage
    from server.gateway import keys

    return [
        StoreSpec(
            "federation",
            "FEDVAULT_FEDERATION_STORE",
            settings.federation_db,
            settings.federation_store,
            settings.federation_store_password_file,
            tuple(store.tables()),
            _open_federation,
        ),
        StoreSpec(
            "gateway",
            "FEDVAULT_GATEWAY_STORE",
            settings.gateway_db,
            settings.gateway_store,
            settings.gateway_store_password_file,
            tuple(keys.tables()),
            _open_gateway,
        ),
        StoreSpec(
            "audit",
            "FEDVAULT_AUDIT_STORE",
            settings.audit_db,
            settings.audit_store,
            settings.audit_store_password_file,
            tuple(storage.tables()),
            _open_audit,
        ),
    ]


def drop_statement(spec: StoreSpec) -> str:
    """The statement that removes a store's tables from its destination (children first).

    ``DROP`` rather than ``DELETE``/``TRUNCATE``, which the append-only
    triggers refuse.
    """
    return "DROP TABLE " + ", ".join(t.name for t in reversed(spec.tables)) + ";"


# ---------------------------------------------------------------- the whole HOME
def migrate_home(
    settings: FedvaultSettings,
    *,
    dry_run: bool = False,
    audit_key: Path | None = None,
    on_store: Callable[[StoreReport], None] | None = None,
    progress: list[StoreReport] | None = None,
) -> list[StoreReport]:
    """Plan every store, then (unless ``dry_run``) copy them one by one.

    ``audit_key``: the audit log's signing key file (default
    ``HOME/keys/gateway-audit.key``), needed when the log holds signed
    checkpoints, to check them before and after the copy. ``on_store`` hears
    about each store as soon as it is committed. ``progress``, if given,
    receives each store's report as soon as the store is looked at, so a
    caller still has them when this raises: the failing store's says
    ``failed`` (or ``failed after commit``) with its error, stores copied
    before it ``migrated``, planned ones not reached ``not migrated``.
    """
    specs = store_specs(settings)
    wanted = [spec for spec in specs if spec.destination is not None]
    if not wanted:
        raise ConfigError(
            "nothing to migrate: none of "
            + ", ".join(spec.setting for spec in specs)
            + " is set (each names the postgresql:// destination of one store)"
        )
    for spec in wanted:
        if not is_postgres_url(spec.destination or ""):
            raise ConfigError(
                f"{spec.name} store: {spec.setting} is not a postgresql:// URL; `fedvault store "
                "migrate` copies HOME's SQLite stores into PostgreSQL"
            )
    if not any(spec.source.is_file() for spec in wanted):
        raise NotFoundError(
            f"nothing to migrate in HOME {settings.home}: none of "
            + ", ".join(str(spec.source) for spec in wanted)
            + " exists (is --home, or FEDVAULT_HOME, the HOME these stores were used with?)"
        )
    key_file = audit_key or settings.audit_key_file
    reports = progress if progress is not None else []
    plans: list[_Plan] = []
    current: _Plan | None = None
    with ExitStack() as held:  # every source's write lock, until the very end
        try:
            for spec in specs:
                current = _Plan(spec, StoreReport(spec.name, spec.setting, str(spec.source)))
                plans.append(current)
                reports.append(current.report)
                _plan(current, settings.registry_dir, key_file, audit_key is not None, held)
            if not dry_run:
                for plan in plans:
                    if plan.report.status == "would migrate":
                        current = plan
                        _copy(plan, settings.registry_dir)
                        plan.report.status = "migrated"
                        if on_store is not None:
                            on_store(plan.report)
        except FedvaultError as exc:
            if current is not None:
                current.report.status = "failed after commit" if current.committed else "failed"
                current.report.error = str(exc)
            if not dry_run:
                for plan in plans:
                    if plan.report.status == "would migrate":
                        plan.report.status = "not migrated"
            raise
    return reports


@dataclass
class _Scan:
    """What the plan read of one source table."""

    columns: list[sa.Column[Any]] | None  # None: the source file has no such table
    rows: int = 0
    digest: int = 0
    widest: int = 0  # bytes of values in its largest row (a model's artifact included)


@dataclass
class _Plan:
    spec: StoreSpec
    report: StoreReport
    source: _Source | None = None
    scans: dict[str, _Scan] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)  # SQLite's AUTOINCREMENT counters
    seeds: dict[str, set[tuple[Any, ...]]] = field(default_factory=dict)
    audit: _AuditKey | None = None
    committed: bool = False


@dataclass(frozen=True, slots=True)
class _AuditKey:
    signer: NoteSigner
    source: str  # where it came from, for messages
    # (size, note) of the source's latest checkpoint; None: the log has none
    latest: tuple[int, str] | None


def _reworded(exc: FedvaultError, text: str) -> FedvaultError:
    """``exc``'s class (so its exit code) with another message."""
    try:
        return type(exc)(text)
    except TypeError:  # a class with more to its constructor than a message
        return exc


@contextmanager
def _named(spec: StoreSpec) -> Iterator[None]:
    """Prefix a fedvault error with the store it concerns (same class, same exit code)."""
    try:
        yield
    except FedvaultError as exc:
        text = str(exc)
        if text.startswith(f"{spec.name} store"):
            raise
        raise _reworded(exc, f"{spec.name} store: {text}") from None


@contextmanager
def _rolled_back() -> Iterator[None]:
    """Say so when a copy's transaction failed: the store holds nothing of it."""
    try:
        yield
    except FedvaultError as exc:
        text = str(exc)
        if "nothing was written" in text or "rolled back" in text:
            raise
        raise _reworded(exc, f"{text}; rolled back, nothing was written") from None


def _no_schema(conn: sa.Connection) -> None:
    """The schema is the store class's to create (destination); a source is never changed."""


def _destination(spec: StoreSpec) -> Database:
    # A "what" of its own: the store class's open (which creates the schema) must
    # not find its database already marked as set up by this connection's open.
    assert spec.destination is not None  # noqa: S101 - planned stores have one
    return open_database(
        spec.destination,
        what=f"destination {spec.name}",
        password_file=spec.password_file,
        schema=_no_schema,
    )


# ------------------------------------------------------------------- the sources
class _NotUtf8:
    """Stands for a source TEXT value that is not UTF-8 (so no message can show it)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<text that is not UTF-8>"


_NOT_UTF8: Final = _NotUtf8()


def _text(raw: bytes) -> str | _NotUtf8:
    # sqlite3's own decoding fails with the value in its message.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _NOT_UTF8


@dataclass(frozen=True, slots=True)
class _Source:
    """A source SQLite file held still: its write lock taken, only ever read."""

    path: Path
    conn: sa.Connection
    raw: sqlite3.Connection

    def still_held(self) -> None:
        if not self.raw.in_transaction:  # pragma: no cover - nothing here ends it
            raise UnavailableError(f"lost the write lock of the source {self.path}")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except (SQLAlchemyError, sqlite3.Error) as exc:
        reason = db_reason(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
        raise UnavailableError(f"cannot read the source {path}: {reason}") from None


@contextmanager
def _held(path: Path) -> Iterator[_Source]:
    """Open an existing SQLite file without changing it and hold its write lock.

    ``BEGIN IMMEDIATE`` on a connection of its own (``mode=rw``: never
    created; none of the pragmas the stores set), then ``query_only``: other
    writers wait for it (and fail after their busy timeout), readers do not,
    every read here sees one snapshot, and no statement can write to the
    file. Leaving rolls back, which releases the lock.
    """
    raws: list[sqlite3.Connection] = []

    def connect() -> sqlite3.Connection:
        raw = sqlite3.connect(
            path.resolve().as_uri() + "?mode=rw",
            uri=True,
            timeout=LOCK_TIMEOUT_S,
            isolation_level=None,
        )
        raw.text_factory = _text
        raws.append(raw)
        return raw

    engine = sa.create_engine("sqlite://", creator=connect, poolclass=sa.pool.StaticPool)

    @sa.event.listens_for(engine, "begin")
    def _lock(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        conn.exec_driver_sql("PRAGMA query_only = ON")

    try:
        try:
            conn = engine.connect()
            conn.begin()
        except (SQLAlchemyError, sqlite3.Error) as exc:
            reason = db_reason(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
            hint = (
                "; stop the coordinator, `federation up` and the gateways that write to it"
                if "locked" in reason
                else ""
            )
            raise UnavailableError(
                f"cannot take the write lock of the source {path}: {reason}{hint}"
            ) from None
        try:
            yield _Source(path, conn, raws[0])
        finally:
            conn.close()  # rolls back: the lock is released
    finally:
        engine.dispose()
        for raw in raws:
            raw.close()


def _plan(
    plan: _Plan, registry_dir: Path, key_file: Path, key_given: bool, held: ExitStack
) -> None:
    spec, report = plan.spec, plan.report
    if spec.destination is None:
        report.reason = f"{spec.setting} is not set"
        return
    report.destination = describe(spec.destination)
    if not spec.source.is_file():
        report.reason = f"no source: {spec.source} does not exist"
        return
    with _named(spec):
        source = held.enter_context(_held(spec.source))
        plan.source = source
        with _reading(spec.source):
            _refuse_unknown_tables(source.conn, spec)
            for table in spec.tables:
                scan = _scan(source, table, registry_dir)
                plan.scans[table.name] = scan
                report.rows[table.name] = scan.rows
            _refuse_dangling(source.conn, spec)
            plan.sequences = _sqlite_sequences(source.conn)
        if spec.name == "audit":
            plan.audit = _check_source_audit(source, spec, key_file, key_given, report)
        if spec.name == "federation":
            checked = [
                f"{report.rows[name]} {what}"
                for name, what in (
                    ("models", "model artifact(s)"),
                    ("checkpoints", "checkpoint(s)"),
                )
                if report.rows.get(name)
            ]
            if checked:
                report.notes.append(
                    f"{' and '.join(checked)} checked against their SHA-256; artifacts move "
                    "into the models rows"
                )
        plan.seeds = _schema_seeds(spec)
        destination = _destination(spec)
        try:
            with destination.read() as conn:
                _refuse_not_utf8(spec, conn)
                _refuse_occupied(spec, conn, plan.seeds)
        finally:
            destination.close()
    report.status = "would migrate"


def _copy(plan: _Plan, registry_dir: Path) -> None:
    spec, report, source = plan.spec, plan.report, plan.source
    assert spec.destination is not None  # noqa: S101 - planned stores have one
    assert source is not None  # noqa: S101 - and hold their source
    with _named(spec):
        spec.open_store(spec.destination, spec.password_file).close()  # the store's own schema
        destination = _destination(spec)
        try:
            with _rolled_back(), destination.write() as dst:
                _lock(dst, spec.tables)
                _refuse_occupied(spec, dst, plan.seeds)
                for table in spec.tables:
                    if table.name in plan.seeds:  # the schema's own rows: the source's replace them
                        dst.execute(table.delete())
                    _copy_table(source, dst, table, registry_dir, plan)
                _reset_sequences(dst, spec.tables, plan.sequences)
                if plan.audit is not None and plan.audit.latest is not None:
                    report.notes.append(_check_copied_tree(source, dst, spec, plan.audit))
                source.still_held()
        finally:
            destination.close()
        plan.committed = True
        if plan.audit is not None:
            report.notes.append(_check_copied_log(spec, plan.audit))
        report.notes.append("row counts and content read back equal to the source's")


# ------------------------------------------------------------------ table copying
def _refuse_unknown_tables(conn: sa.Connection, spec: StoreSpec) -> None:
    """A table this release does not declare would not be copied: refused, not dropped."""
    declared = {t.name for t in spec.tables}
    present = sa.inspect(conn).get_table_names()
    unknown = sorted(n for n in present if n not in declared and not n.startswith("sqlite_"))
    if unknown:
        raise ConfigError(
            f"the source {spec.source} holds tables this fedvault does not know "
            f"({', '.join(unknown)}); migrate with the fedvault release that wrote it"
        )


def _source_columns(conn: sa.Connection, table: sa.Table) -> list[sa.Column[Any]] | None:
    """The declared columns the source file has (None: no such table in it).

    Files from older releases may lack a column added since (``models.artifact_blob``);
    it is then NULL in the copy. A column the declaration does not know means the
    file is newer than this fedvault: refused rather than silently dropped.
    """
    inspector = sa.inspect(conn)
    if not inspector.has_table(table.name):
        return None
    present = {str(c["name"]) for c in inspector.get_columns(table.name)}
    unknown = sorted(present - set(table.c.keys()))
    if unknown:
        raise ConfigError(
            f"source table {table.name} has columns this fedvault does not know "
            f"({', '.join(unknown)}); migrate with the fedvault release that wrote it"
        )
    return [c for c in table.c if c.name in present]


def _scan(source: _Source, table: sa.Table, registry_dir: Path) -> _Scan:
    """Read every row of a source table through the copy's checks (the plan's part)."""
    scan = _Scan(_source_columns(source.conn, table))
    if scan.columns is None:
        return scan
    digest = _Digest(table)
    for batch in _source_rows(source, table, scan.columns, registry_dir):
        for row in batch:
            digest.add(row)
            scan.widest = max(scan.widest, _row_bytes(row))
    scan.rows, scan.digest = digest.rows, digest.value
    return scan


def _row_bytes(row: Mapping[str, Any]) -> int:
    return sum(len(v) if isinstance(v, str | bytes) else 8 for v in row.values())


def _source_rows(
    source: _Source,
    table: sa.Table,
    columns: Sequence[sa.Column[Any]],
    registry_dir: Path,
) -> Iterator[list[dict[str, Any]]]:
    """The source's rows in primary-key order, checked, in batches bounded by rows and bytes.

    Models carry their artifact (read from the registry and checked).
    """
    check = _row_checker(table, registry_dir)
    query = sa.select(*columns).order_by(*table.primary_key.columns)
    with _reading(source.path):
        batch: list[dict[str, Any]] = []
        size = 0
        for stored in source.conn.execute(query):
            row = check(dict(stored._mapping))
            batch.append(row)
            size += _row_bytes(row)
            if len(batch) >= BATCH or size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch


def _kind(column: sa.Column[Any]) -> str:
    kind = column.type
    if isinstance(kind, sa.LargeBinary):
        return "bytes"
    if isinstance(kind, sa.Float):
        return "float"
    if isinstance(kind, sa.Integer):
        return "int"
    if isinstance(kind, sa.String):
        return "text"
    raise FedvaultError(
        f"{column.table.name}.{column.name} is a {kind!r} column, which `fedvault store "
        "migrate` does not know how to check and compare (a fedvault bug: please report it)"
    )


def _int_range(column: sa.Column[Any]) -> tuple[int, int]:
    """What the column's PostgreSQL type holds (SQLite's integers are all 64-bit)."""
    if isinstance(column.type, sa.SmallInteger):
        bits = 16
    elif isinstance(column.type, sa.BigInteger):
        bits = 64
    else:
        bits = 32
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


_ACCEPTED: Final[dict[str, tuple[type, ...]]] = {
    "bytes": (bytes, memoryview),
    "float": (float, int),
    "int": (int,),
    "text": (str,),
}


def _key(table: sa.Table, row: Mapping[Any, Any]) -> str:
    """A row's primary key, to name it in a message (its other values never are)."""
    return ", ".join(f"{c.name}={row.get(c.name)!r}" for c in table.primary_key)


def _type_checker(table: sa.Table) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Refuse a source value PostgreSQL would refuse or convert, before anything is written.

    SQLite stores whatever a hand edit (or an older release) put in a column:
    text in a BLOB, a fraction in an INTEGER, a NUL character inside text, a
    NULL in a ``TEXT PRIMARY KEY``. PostgreSQL would convert some of it
    silently and refuse the rest at insert time, in the middle of a copy. The
    copy carries values, not conversions, so such a row stops the store; the
    message names the row by its key, never the value.
    """
    kinds = {c.name: _kind(c) for c in table.c}
    required = {c.name for c in table.c if c.primary_key or not c.nullable}
    ranges = {c.name: _int_range(c) for c in table.c if kinds[c.name] == "int"}

    def refuse(row: Mapping[str, Any], name: str, what: str) -> IntegrityError:
        return IntegrityError(
            f"source row {table.name} ({_key(table, row)}): {table.name}.{name} {what}; "
            "nothing was written"
        )

    def check(row: dict[str, Any]) -> dict[str, Any]:
        for name, value in row.items():
            kind = kinds[name]
            if value is None:
                if name in required:
                    raise refuse(
                        row, name, "is NULL, which PostgreSQL refuses in a key or NOT NULL column"
                    )
                continue
            if isinstance(value, bool) or not isinstance(value, _ACCEPTED[kind]):
                held = repr(value) if value is _NOT_UTF8 else f"a {type(value).__name__}"
                raise refuse(row, name, f"holds {held}, not {kind} (edited by hand?)")
            if isinstance(value, str) and "\x00" in value:
                raise refuse(row, name, "holds a NUL character, which PostgreSQL text cannot store")
            if name in ranges and isinstance(value, int):
                low, high = ranges[name]
                if not low <= value <= high:
                    raise refuse(
                        row, name, "holds an integer beyond the range of its PostgreSQL type"
                    )
        return row

    return check


def _row_checker(table: sa.Table, registry_dir: Path) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """:func:`_type_checker`, then a model's artifact or a checkpoint's state against its digest."""
    check = _type_checker(table)
    if table.name == "models":
        return lambda row: _with_artifact(check(row), registry_dir)
    if table.name == "checkpoints":
        return lambda row: _checked_state(check(row))
    return check


def _with_artifact(row: dict[str, Any], registry_dir: Path) -> dict[str, Any]:
    """``row`` with its sealed artifact in ``artifact_blob``, checked against ``artifact_sha256``.

    The file is read from the registry directory where the row has no blob
    (the SQLite default). A missing or altered artifact is an
    :class:`IntegrityError` naming the model: a copy must not launder it.
    """
    model_id = row["model_id"]
    blob = row.get("artifact_blob")
    if blob is None:
        name = str(row["artifact"])
        if not name or Path(name).name != name or name in (".", ".."):
            raise IntegrityError(
                f"model {model_id}: its artifact {name!r} is not a file name in the registry"
            )
        path = registry_dir / name
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(
                f"model {model_id}: its artifact {path} is missing; nothing was written"
            ) from None
        except OSError as exc:
            raise UnavailableError(
                f"model {model_id}: cannot read its artifact {path}: {exc.strerror}"
            ) from None
        where = str(path)
    else:
        blob = bytes(blob)
        where = "stored in its row"
    if hashlib.sha256(blob).hexdigest() != row["artifact_sha256"]:
        raise IntegrityError(
            f"model {model_id}: artifact {where} does not match the SHA-256 recorded at "
            "registration (altered or replaced); nothing was written"
        )
    return {**row, "artifact_blob": blob}


def _checked_state(row: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint whose state matches its recorded SHA-256 (else it cannot resume)."""
    if hashlib.sha256(row["state"]).hexdigest() != row["sha256"]:
        raise IntegrityError(
            f"the training checkpoint of run {row['run_id']!r} (round {row['round']}) does not "
            "match the SHA-256 recorded with it (altered or corrupt); nothing was written"
        )
    return row


def _normaliser(table: sa.Table) -> Callable[[Mapping[Any, Any]], tuple[Any, ...]]:
    """A row as comparable values, whichever database it came from (for small sets)."""
    kinds = [(column.name, _kind(column)) for column in table.c]

    def normalise(row: Mapping[Any, Any]) -> tuple[Any, ...]:
        out: list[Any] = []
        for name, kind in kinds:
            value = row.get(name)
            if value is None:
                out.append(None)
            elif kind == "bytes":
                out.append(bytes(value))
            elif kind == "float":
                out.append(float(value).hex())
            elif kind == "int":
                out.append(int(value))
            else:
                out.append(value)
        return tuple(out)

    return normalise


class _Digest:
    """An order-independent digest of a table's rows (SHA-256 per row, summed).

    Order-independent because SQLite and PostgreSQL sort text keys differently
    (bytes vs the database's collation); rows are unique by primary key. Each
    row is hashed column by column, every value behind its kind and length,
    so a large blob is hashed where it lies rather than copied into a text.
    """

    def __init__(self, table: sa.Table) -> None:
        self._kinds = [(column.name, _kind(column)) for column in table.c]
        self.rows = 0
        self._sum = 0

    def add(self, row: Mapping[Any, Any]) -> None:
        digest = hashlib.sha256()
        for name, kind in self._kinds:
            value = row.get(name)
            data: bytes | memoryview
            if value is None:
                digest.update(b"N")
                continue
            if kind == "bytes":
                data = value if isinstance(value, bytes | memoryview) else bytes(value)
            elif kind == "float":
                data = float(value).hex().encode()
            elif kind == "int":
                data = str(int(value)).encode()
            else:
                data = str(value).encode()
            size = data.nbytes if isinstance(data, memoryview) else len(data)
            digest.update(kind[:1].encode() + size.to_bytes(8, "big"))
            digest.update(data)
        self._sum = (self._sum + int.from_bytes(digest.digest(), "big")) % _MOD
        self.rows += 1

    @property
    def value(self) -> int:
        return self._sum


def _fetch_size(widest: int) -> int:
    """Rows per fetch for rows of at most ``widest`` bytes of values."""
    return max(1, min(BATCH, BATCH_BYTES // max(1, widest)))


def _copy_table(
    source: _Source,
    dst: sa.Connection,
    table: sa.Table,
    registry_dir: Path,
    plan: _Plan,
) -> None:
    """Insert every source row of ``table``; compare with the plan's reading and read back."""
    scan = plan.scans[table.name]
    sent = _Digest(table)
    if scan.columns is not None:
        for batch in _source_rows(source, table, scan.columns, registry_dir):
            dst.execute(table.insert(), batch)
            for row in batch:
                sent.add(row)
    if sent.rows != scan.rows or sent.value != scan.digest:  # pragma: no cover - lock held
        raise IntegrityError(
            f"table {table.name}: the source changed since it was checked ({scan.rows} rows "
            f"then, {sent.rows} now); rolled back"
        )
    back = _Digest(table)
    query = sa.select(*table.c).execution_options(yield_per=_fetch_size(scan.widest))
    for stored in dst.execute(query):
        back.add(stored._mapping)
    if back.rows != sent.rows or back.value != sent.value:
        raise IntegrityError(
            f"table {table.name}: the copy does not read back as the source "
            f"({sent.rows} rows sent, {back.rows} read back); rolled back"
        )
    plan.report.rows[table.name] = sent.rows


def _lock(conn: sa.Connection, tables: Sequence[sa.Table]) -> None:
    """Keep writers out until the copy commits (readers are not blocked)."""
    quote = conn.dialect.identifier_preparer.format_table
    names = ", ".join(quote(t) for t in tables)
    conn.execute(sa.text(f"LOCK TABLE {names} IN SHARE ROW EXCLUSIVE MODE"))


def _sqlite_sequences(conn: sa.Connection) -> dict[str, int]:
    """SQLite's AUTOINCREMENT counters (``sqlite_sequence``): the largest key ever handed out."""
    exists = conn.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'"
    ).first()
    if exists is None:
        return {}
    rows = conn.exec_driver_sql("SELECT name, seq FROM sqlite_sequence").all()
    return {str(name): seq for name, seq in rows if isinstance(seq, int)}


def _reset_sequences(
    conn: sa.Connection, tables: Sequence[sa.Table], sequences: Mapping[str, int]
) -> None:
    """Move each identity/serial sequence past the copied keys.

    Rows were inserted with their own keys (the ledger's ``seq``), which does
    not advance the sequence: the next insert would collide without this. An
    AUTOINCREMENT table's counter may be past its largest key (rows deleted
    at the end, by hand): the sequence goes past that too, so no key is ever
    handed out twice.
    """
    for table in tables:
        for column in table.primary_key.columns:
            if not isinstance(column.type, sa.Integer):
                continue
            sequence = conn.execute(
                sa.text("SELECT pg_get_serial_sequence(:t, :c)"),
                {"t": table.name, "c": column.name},
            ).scalar()
            if sequence is None:
                continue
            top = conn.execute(sa.select(sa.func.max(column))).scalar()
            used = [int(v) for v in (top, sequences.get(table.name)) if v is not None]
            conn.execute(
                sa.text("SELECT setval(CAST(:s AS regclass), :v, :called)"),
                {"s": sequence, "v": max(used, default=1), "called": bool(used)},
            )


def _refuse_dangling(conn: sa.Connection, spec: StoreSpec) -> None:
    """A row whose foreign key points nowhere (possible in SQLite): PostgreSQL would refuse it."""
    present = set(sa.inspect(conn).get_table_names())
    for table in spec.tables:
        for fk in table.foreign_keys:
            child, parent = fk.parent, fk.column
            if table.name not in present or parent.table.name not in present:
                continue
            orphan = conn.execute(
                sa.select(*table.primary_key.columns)
                .where(child.is_not(None), ~sa.exists().where(parent == child))
                .limit(1)
            ).first()
            if orphan is not None:
                raise IntegrityError(
                    f"source row {table.name} ({_key(table, orphan._mapping)}): "
                    f"{table.name}.{child.name} refers to a {parent.table.name} row that does "
                    "not exist, which PostgreSQL refuses; nothing was written"
                )


def _schema_seeds(spec: StoreSpec) -> dict[str, set[tuple[Any, ...]]]:
    """The rows the store's schema writes into an empty database, per table.

    Such rows (the gateway's revocation counter at 0) are not data: a
    destination holding only them is empty. Found by opening an empty SQLite
    store with the store's own class rather than by listing them here.
    """
    seeds: dict[str, set[tuple[Any, ...]]] = {}
    with tempfile.TemporaryDirectory(prefix="fedvault-migrate-") as tmp:
        path = Path(tmp) / "empty.db"
        spec.open_store(str(path), None).close()
        empty = open_database(path, what=f"empty {spec.name}", schema=_no_schema)
        try:
            with empty.read() as conn:
                for table in spec.tables:
                    normalise = _normaliser(table)
                    rows = {normalise(r._mapping) for r in conn.execute(sa.select(*table.c))}
                    if rows:
                        seeds[table.name] = rows
        finally:
            empty.close()
    return seeds


def _refuse_not_utf8(spec: StoreSpec, conn: sa.Connection) -> None:
    """Text the stores hold is Unicode: a database in another encoding would refuse some."""
    encoding = conn.execute(sa.text("SHOW server_encoding")).scalar()
    if encoding != "UTF8":
        raise ConfigError(
            f"the destination ({spec.setting}, {describe(spec.destination or '')}) is a "
            f"{encoding} database; fedvault's stores need UTF8 (CREATE DATABASE … ENCODING "
            "'UTF8'); nothing was written"
        )


def _refuse_occupied(
    spec: StoreSpec, conn: sa.Connection, seeds: Mapping[str, set[tuple[Any, ...]]]
) -> None:
    """Raise :class:`ConflictError` if the destination holds any data."""
    inspector = sa.inspect(conn)
    held: list[str] = []
    for table in spec.tables:
        if not inspector.has_table(table.name):
            continue
        count = _count(conn, table)
        if count == 0:
            continue
        if table.name in seeds:
            normalise = _normaliser(table)
            rows = {normalise(r._mapping) for r in conn.execute(sa.select(*table.c))}
            if rows <= seeds[table.name]:
                continue
        held.append(f"{table.name}: {count} row(s)")
    if held:
        raise ConflictError(
            f"the destination ({spec.setting}, {describe(spec.destination or '')}) already "
            f"holds data ({'; '.join(held)}); refusing to migrate into it, nothing was written. "
            f"If an earlier `fedvault store migrate` copied this store, unset {spec.setting} "
            "for this run to skip it"
        )


def _count(conn: sa.Connection, table: sa.Table) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


# ---------------------------------------------------------------------- audit log
def _audit_key(key_file: Path, key_given: bool, latest: tuple[int, str] | None) -> _AuditKey:
    """The log's signing key, needed only where the log holds signed checkpoints."""
    from secure.signed_note import generate_note_key, load_note_signer

    label = f"--audit-key {key_file}" + ("" if key_given else " (the default)")
    if key_file.is_file() or key_given:
        return _AuditKey(load_note_signer(key_file), label, latest)
    if latest is not None:
        raise ConfigError(
            f"the audit log holds signed checkpoints; checking them before and after the copy "
            f"needs the key that signed them: give --audit-key FILE ({key_file} does not exist)"
        )
    # No checkpoint: nothing to check a signature against, and AuditLog signs
    # nothing unless asked; a throwaway key lets it rehash the log.
    return _AuditKey(generate_note_key("fedvault/store-migrate"), "a throwaway key", None)


class _SourceLog:
    """The source audit log read through its held connection: one snapshot, nothing written.

    The :class:`~server.audit.storage.AuditStorage` an :class:`AuditLog` needs
    to check the log; unlike ``SQLiteStorage`` it runs no schema script on
    the file (which would re-create a dropped trigger).
    """

    def __init__(self, source: _Source, tables: Sequence[sa.Table]) -> None:
        by_name = {t.name: t for t in tables}
        self._source = source
        self._entries = by_name["audit_entries"]
        self._nodes = by_name["audit_nodes"]
        self._checkpoints = by_name["audit_checkpoints"]

    def _run(self, query: sa.Executable) -> list[tuple[Any, ...]]:
        with _reading(self._source.path):
            return [tuple(row) for row in self._source.conn.execute(query)]

    def append(self, entries: Sequence[bytes]) -> int:
        raise UnavailableError("the source audit log is only read")

    def save_checkpoint(
        self, size: int, note: str, *, check: CheckpointCheck | None = None
    ) -> None:
        raise UnavailableError("the source audit log is only read")

    def size(self) -> int:
        idx = self._entries.c.idx
        return int(self._run(sa.select(sa.func.coalesce(sa.func.max(idx) + 1, 0)))[0][0])

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        t = self._entries
        rows = self._run(
            sa.select(t.c.idx, t.c.entry).where(t.c.idx >= start, t.c.idx < end).order_by(t.c.idx)
        )
        return [(int(i), bytes(e)) for i, e in rows]

    def nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        t = self._nodes
        found: dict[NodeKey, bytes] = {}
        wanted = sorted(set(keys))
        for start in range(0, len(wanted), 400):
            chunk = wanted[start : start + 400]
            rows = self._run(
                sa.select(t.c.level, t.c.idx, t.c.hash).where(
                    sa.tuple_(t.c.level, t.c.idx).in_(chunk)
                )
            )
            found.update({(int(lv), int(i)): bytes(h) for lv, i, h in rows})
        if len(found) != len(wanted):
            gone = sorted(set(wanted) - found.keys())[:3]
            raise IntegrityError(f"audit tree nodes missing from the store (e.g. {gone}): damaged")
        return found

    def latest_checkpoint(self) -> tuple[int, str] | None:
        t = self._checkpoints
        rows = self._run(sa.select(t.c.size, t.c.note).order_by(t.c.size.desc()).limit(1))
        return None if not rows else (int(rows[0][0]), str(rows[0][1]))

    def close(self) -> None:
        """Nothing: the migration releases the source when it ends."""


def _check_source_audit(
    source: _Source, spec: StoreSpec, key_file: Path, key_given: bool, report: StoreReport
) -> _AuditKey:
    """Refuse a damaged source log: its latest checkpoint and every entry are checked."""
    from server.audit.log import AuditLog

    storage = _SourceLog(source, spec.tables)
    latest = storage.latest_checkpoint()
    key = _audit_key(key_file, key_given, latest)
    try:
        # Opening checks the latest checkpoint (signer, root at its size, no lost
        # entries), as a gateway's start does; verify_store rehashes every entry.
        log = AuditLog(storage, key.signer, key_source=key.source)
        try:
            size = log.verify_store()
        finally:
            log.close()
    except SigningKeyMismatchError:
        ours = key.signer.verifier
        raise SigningKeyMismatchError(
            f"the latest checkpoint of {source.path} is not signed by "
            f"{ours.name}+{ours.key_id:08x} ({key.source}); give the key that signs this log "
            "with --audit-key (a signing-key rotation must be finished first)"
        ) from None
    except IntegrityError as exc:
        raise IntegrityError(
            f"the source audit log {source.path} is damaged ({exc}); refusing to migrate it, "
            "nothing was written"
        ) from None
    if latest is None:
        report.notes.append(f"{size} audit entries verified; no signed checkpoint yet")
    else:
        verifier = key.signer.verifier
        report.notes.append(
            f"{size} audit entries verified; latest checkpoint (size {latest[0]}) signed by "
            f"{verifier.name}+{verifier.key_id:08x}"
        )
    return key


def _tree_root(conn: sa.Connection, nodes: sa.Table, size: int) -> bytes:
    from server.audit import merkle

    keys = merkle.Frontier.keys_for(size)
    found: dict[merkle.NodeKey, bytes] = {}
    if keys:
        rows = conn.execute(
            sa.select(nodes.c.level, nodes.c.idx, nodes.c.hash).where(
                sa.tuple_(nodes.c.level, nodes.c.idx).in_(keys)
            )
        )
        found = {(int(lv), int(i)): bytes(h) for lv, i, h in rows}
    if len(found) != len(set(keys)):
        raise IntegrityError(f"audit tree nodes for size {size} are missing")
    return merkle.root_from_nodes(size, found)


def _check_copied_tree(source: _Source, dst: sa.Connection, spec: StoreSpec, key: _AuditKey) -> str:
    """Inside the copy's transaction: same latest checkpoint, same root, note still opens."""
    from secure.signed_note import open_note, parse_checkpoint

    assert key.latest is not None  # noqa: S101 - called only for a log with checkpoints
    by_name = {t.name: t for t in spec.tables}
    nodes, checkpoints = by_name["audit_nodes"], by_name["audit_checkpoints"]
    size, note = key.latest
    copied = dst.execute(
        sa.select(checkpoints.c.size, checkpoints.c.note)
        .order_by(checkpoints.c.size.desc())
        .limit(1)
    ).first()
    if copied is None or (int(copied[0]), str(copied[1])) != (size, note):
        raise IntegrityError("the copied log's latest checkpoint is not the source's; rolled back")
    signed = parse_checkpoint(open_note(note, key.signer.verifier))
    root = _tree_root(dst, nodes, size)
    with _reading(source.path):
        theirs = _tree_root(source.conn, nodes, size)
    if root != theirs or root != signed.root or signed.size != size:
        raise IntegrityError(
            f"the copied tree's root at size {size} differs from the source's or the signed "
            "one; rolled back"
        )
    return f"tree root at checkpoint size {size} equals the source's; the note opens"


def _check_copied_log(spec: StoreSpec, key: _AuditKey) -> str:
    """After the commit: open the copy as a gateway would, and rehash every entry."""
    from server.audit.log import AuditLog
    from server.audit.storage import open_storage

    assert spec.destination is not None  # noqa: S101 - planned stores have one
    try:
        storage = open_storage(spec.destination, password_file=spec.password_file)
        try:
            log = AuditLog(storage, key.signer, key_source=key.source)
        except BaseException:
            storage.close()
            raise
        try:
            size = log.verify_store()
        finally:
            log.close()
    except (IntegrityError, SigningKeyMismatchError) as exc:
        raise _reworded(
            exc,
            f"the copy was committed to {describe(spec.destination)} but does not verify "
            f"({exc}); remove it before migrating again: {drop_statement(spec)}",
        ) from None
    opened = "opens with its checkpoint" if key.latest is not None else "opens"
    return f"copied log {opened} and rehashes ({size} entries)"
