"""One way to open a store's database: a SQLite file (embedded default) or PostgreSQL.

Why one helper: the federation store (runs, ledger, registry), the gateway's
key store and the audit log all accept "a SQLite path or a PostgreSQL URL
without password, plus a password file". Parsing that, reading the secret,
refusing a password in the URL and turning driver errors into fedvault errors
that carry neither SQL, parameters nor the password happens here, once.

Stores speak SQLAlchemy Core to a :class:`Database`, so one statement serves
both dialects — and one ``Table`` declaration is each store's schema on both:
:func:`create_tables` turns it into the SQLite files' DDL (``INTEGER``/``REAL``
column types, SQLite-only defaults, append-only triggers) and PostgreSQL's.
SQLite keeps the behaviour of :mod:`fedvault.sqlite` — WAL,
``synchronous=FULL``, and writers that take the lock up front with
``BEGIN IMMEDIATE`` — because its connections come from
:func:`fedvault.sqlite.connect`. PostgreSQL engines are shared per process
and URL: a gateway that opens the federation store for each console request
reuses pooled (TLS) connections instead of dialling the server every time.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateColumn, CreateIndex, CreateTable
from sqlalchemy.sql.compiler import DDLCompiler

from fedvault.errors import ConfigError, ConflictError, NotFoundError, UnavailableError
from fedvault.sqlite import append_only_trigger_statements, connect

__all__ = [
    "FLOAT64",
    "INT64",
    "SQLITE_NOW",
    "Database",
    "add_columns",
    "append_only",
    "create_tables",
    "db_reason",
    "insert_if_absent",
    "is_postgres_url",
    "key_column",
    "open_database",
    "postgres_url",
    "read_password",
    "sqlite_default",
    "url_has_password",
]

_PG_SCHEMES = ("postgresql://", "postgres://", "postgresql+")


def is_postgres_url(location: str | Path) -> bool:
    """``postgresql://…``, ``postgres://…`` or ``postgresql+driver://…``: else a SQLite path."""
    return str(location).startswith(_PG_SCHEMES)


_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})
"""libpq connection parameters that hold a secret; a URL's query string may set them."""


def url_has_password(location: str) -> bool:
    """Whether a URL carries a secret, read the way SQLAlchemy and libpq will read it.

    That is a password in its userinfo (``user:secret@host`` — also when the
    secret holds ``/``, ``?`` or ``+``, as base64 passwords do, which
    SQLAlchemy still takes as the password) or a ``password`` /
    ``sslpassword`` query parameter (``…/db?password=secret``), which the
    driver receives as a connection argument.
    """
    if "://" not in location:
        return False
    try:
        url = sa.engine.make_url(location)
    except (ValueError, SQLAlchemyError):
        # Unparseable (a bad port, say): the same grammar by hand, erring on refusal.
        rest = location.split("://", 1)[1]
        return bool(
            re.match(r"[^:/]*:[^@]*@", rest) or re.search(r"[?&](ssl)?password=", rest, re.I)
        )
    keys = {str(k).strip().lower() for k in url.query}
    return url.password is not None or not keys.isdisjoint(_SECRET_PARAMETERS)


# The libpq keywords a "key=value" connection string starts with in practice.
_LIBPQ_KEYWORD = re.compile(
    r"\s*(host|hostaddr|port|dbname|user|password|passfile|service|sslmode|"
    r"connect_timeout|application_name|options)\s*=",
    re.IGNORECASE,
)


def location_problem(location: str) -> str | None:
    """Why ``location`` is neither a SQLite path nor a usable PostgreSQL URL; None if fine.

    Anything that is not a PostgreSQL URL used to be taken as a file path, so
    ``mysql://…`` or a libpq ``host=… password=…`` string became a SQLite
    file of that name — the password in a file name. The answer never quotes
    the value (it may hold a secret), only its scheme.
    """
    if is_postgres_url(location):
        if url_has_password(location):
            return "must not contain a password; give it a password file"
        try:
            parts = urlsplit(location)
            port = parts.port
        except ValueError:
            # Not the parser's words: they quote the text after the last ':'.
            return "is not a valid PostgreSQL URL (check its host, and its port: 1-65535)"
        if port == 0:
            return "is not a valid PostgreSQL URL (check its host, and its port: 1-65535)"
        if not parts.hostname and not parts.path.strip("/"):
            return "is not a valid PostgreSQL URL (no host and no database)"
        return None
    if "://" in location:
        scheme = location.split("://", 1)[0][:20]
        return f"names a {scheme!r} URL; fedvault stores are SQLite paths or postgresql:// URLs"
    if _LIBPQ_KEYWORD.match(location):
        return (
            "looks like a libpq 'key=value' connection string; give a postgresql:// URL "
            "without password (the password goes in a password file)"
        )
    return None


def check_location(location: str | Path, what: str) -> None:
    """Raise :class:`ConfigError` if ``location`` cannot name a store.

    See :func:`location_problem`.
    """
    problem = location_problem(str(location))
    if problem is not None:
        raise ConfigError(f"the {what} location {problem}")


def require_store(location: str | Path, what: str, hint: str) -> None:
    """Raise :class:`NotFoundError` if ``location`` is a SQLite path with no file there.

    For commands that only read: opening a SQLite path creates the file (a
    PostgreSQL URL names a database that must exist anyway).
    """
    text = str(location)
    if not is_postgres_url(text) and not Path(text).is_file():
        raise NotFoundError(f"no {what} at {text}: {hint} (or give the right --home)")


def postgres_url(location: str, what: str = "database") -> str:
    """The SQLAlchemy URL for ``location``: psycopg (3) unless a driver is named.

    Every PostgreSQL engine fedvault opens is built from this URL, so a
    password in it is refused here (a :class:`ConfigError` naming ``what``,
    never the URL): the secret belongs in a password file.
    """
    if url_has_password(location):
        raise ConfigError(f"the {what} URL must not contain a password; give it a password file")
    if location.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + location.split("://", 1)[1]
    return location


def describe(location: str | Path) -> str:
    """A printable name for a store: the path, or the URL's host and database only."""
    text = str(location)
    if not is_postgres_url(text):
        return text
    parts = urlsplit(text)
    port = f":{parts.port}" if parts.port else ""
    return f"postgresql://{parts.hostname or ''}{port}{parts.path}"


def read_password(password_file: Path | None, what: str) -> str | None:
    """The database password from its (mounted secret) file; None without one.

    An empty file is refused rather than read as "no password": libpq would
    then fall back to ``PGPASSWORD`` or ``~/.pgpass`` without a word (a
    compose secret made from an unset variable is an empty file). Every
    fault here is the deployment's (a wrong path, a bad mount), so it is a
    configuration error, not an unreachable service. Nothing of the file's
    content reaches a message.
    """
    if password_file is None:
        return None
    try:
        raw = password_file.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the {what} password file {password_file}: {exc.strerror}"
        ) from None
    try:
        password: str | None = raw.decode("utf-8").strip()
    except UnicodeDecodeError:  # its args hold the file's bytes: raise outside, no context
        password = None
    if password is None:
        raise ConfigError(f"the {what} password file {password_file} is not UTF-8 text")
    if not password:
        raise ConfigError(f"the {what} password file {password_file} is empty")
    return password


def db_reason(exc: BaseException) -> str:
    """The driver's first line, without SQL or parameters (which may hold data).

    The password never reaches a driver message: it travels in
    ``connect_args``, not in the URL.
    """
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else type(exc).__name__
    return (text.splitlines() or [type(exc).__name__])[0]


class Database:
    """An engine, whether it is PostgreSQL, and transactions that translate errors.

    ``write()`` is one transaction (``BEGIN IMMEDIATE`` on SQLite, so the
    write lock is taken before the first read and a read-then-write cannot
    lose an update); ``read()`` a connection for reads. Inside either, a
    violated constraint becomes :class:`ConflictError` and any other database
    failure :class:`UnavailableError` — messages name ``what``, never SQL.
    """

    def __init__(self, engine: sa.Engine, *, postgres: bool, what: str, owned: bool) -> None:
        self.engine = engine
        self.postgres = postgres
        self.what = what
        self._owned = owned
        self._writer = engine.execution_options(fedvault_write=True)

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        with self._translate(), self._writer.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        with self._translate(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except SAIntegrityError as exc:
            raise ConflictError(f"database constraint violated: {db_reason(exc)}") from None
        except (SQLAlchemyError, sqlite3.Error) as exc:
            raise UnavailableError(f"{self.what} database error: {db_reason(exc)}") from None

    def insert_or_update(
        self, table: sa.Table, values: dict[str, Any], keys: list[str]
    ) -> sa.Executable:
        """``INSERT … ON CONFLICT (keys) DO UPDATE`` the other columns, in this dialect."""
        if self.postgres:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            pg = pg_insert(table).values(**values)
            rest = {k: pg.excluded[k] for k in values if k not in keys}
            return pg.on_conflict_do_update(index_elements=keys, set_=rest)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        lite = sqlite_insert(table).values(**values)
        rest = {k: lite.excluded[k] for k in values if k not in keys}
        return lite.on_conflict_do_update(index_elements=keys, set_=rest)

    def close(self) -> None:
        """Release a SQLite file's connections; a shared PostgreSQL pool stays for reuse."""
        if self._owned:
            self.engine.dispose()


_pg_lock = threading.Lock()
_pg_engines: dict[tuple[str, str | None], sa.Engine] = {}
_pg_ready: set[tuple[int, str]] = set()


def pg_connect_args(password: str | None) -> dict[str, str]:
    """What every PostgreSQL connection is opened with, beside its URL.

    The password travels here rather than in the URL, so URLs can be logged
    and configured in plain sight while the secret stays in its file. The
    client encoding is pinned because a ``SQL_ASCII`` database would
    otherwise hand text back as bytes, and SQLAlchemy's dialect dies on them
    with a ``TypeError`` while still reading the server version — before
    :func:`require_utf8` could say what is wrong.
    """
    args = {"client_encoding": "utf8"}
    if password:
        args["password"] = password
    return args


def require_utf8(conn: sa.Connection, what: str, location: str) -> None:
    """Refuse a database not in UTF8: the stores hold Unicode text.

    ``SQL_ASCII`` would store whatever bytes arrive and ``LATIN1`` would
    refuse some writes later, mid-run; refusing at open loses nothing.
    """
    encoding = conn.execute(sa.text("SHOW server_encoding")).scalar()
    if encoding != "UTF8":
        raise ConfigError(
            f"the {what} database {describe(location)} is a {encoding} database; "
            "fedvault's stores need UTF8 (CREATE DATABASE … ENCODING 'UTF8')"
        )


def _pg_engine(url: str, password: str | None) -> sa.Engine:
    with _pg_lock:
        engine = _pg_engines.get((url, password))
        if engine is None:
            engine = sa.create_engine(
                url, pool_pre_ping=True, pool_size=8, connect_args=pg_connect_args(password)
            )
            _pg_engines[(url, password)] = engine
        return engine


def _sqlite_engine(path: Path) -> sa.Engine:
    engine = sa.create_engine(
        "sqlite://",
        creator=lambda: connect(path, check_same_thread=False),
        poolclass=sa.pool.QueuePool,
        pool_size=4,
        max_overflow=8,
    )

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # fedvault.sqlite.connect opens in autocommit mode (isolation_level=None):
        # the transaction is ours to start, and writers take the lock up front.
        mode = "IMMEDIATE" if conn.get_execution_options().get("fedvault_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def open_database(
    location: str | Path,
    *,
    what: str,
    password_file: Path | None = None,
    schema: Callable[[sa.Connection], None],
) -> Database:
    """Open ``location`` and make sure its schema exists.

    ``schema`` (idempotent: :func:`create_tables` and friends) serves both
    dialects. SQLite runs it on a plain autocommit connection — each
    statement its own transaction, as a DDL script would — so existing files
    keep exactly the tables they had and two processes opening a new file
    together both succeed. PostgreSQL runs it once per process and database,
    in one transaction under an advisory lock, so replicas starting together
    do not race on ``CREATE TABLE``.
    """
    text = str(location)
    check_location(text, f"{what} database")
    if not is_postgres_url(text):
        path = Path(text)
        setup = sa.create_engine(
            "sqlite://", creator=lambda: connect(path), poolclass=sa.pool.NullPool
        )
        try:
            with setup.connect() as conn:
                schema(conn)
                conn.commit()
        except (SQLAlchemyError, sqlite3.Error) as exc:
            reason = db_reason(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
            raise UnavailableError(f"cannot open {what} database {path}: {reason}") from None
        finally:
            setup.dispose()
        return Database(_sqlite_engine(path), postgres=False, what=what, owned=True)
    if url_has_password(text):
        raise ConfigError(
            f"the {what} database URL must not contain a password; give it a password file"
        )
    engine = _pg_engine(postgres_url(text), read_password(password_file, f"{what} database"))
    db = Database(engine, postgres=True, what=what, owned=False)
    key = (id(engine), what)
    if key not in _pg_ready:
        lock_id = int.from_bytes(hashlib.sha256(f"fedvault:{what}".encode()).digest()[:8]) >> 1
        try:
            with engine.begin() as pg:
                require_utf8(pg, what, text)
                pg.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_id})
                schema(pg)
        except SQLAlchemyError as exc:
            raise UnavailableError(
                f"cannot open the {what} database {describe(text)}: {db_reason(exc)}"
            ) from None
        _pg_ready.add(key)
    return db


# -- one schema, two dialects -------------------------------------------------
#
# A store declares its tables once, as SQLAlchemy ``Table``s; these pieces make
# that declaration produce, on SQLite, the schema its files have always had
# (``INTEGER``/``REAL`` columns, ``TEXT PRIMARY KEY``, timestamp defaults,
# trigger-enforced append-only ledgers), and on PostgreSQL what it always had.

# 64-bit integers and doubles: BIGINT and DOUBLE PRECISION on PostgreSQL, the
# INTEGER and REAL that SQLite files declare (same affinity, same PRAGMA output).
INT64: Final[sa.BigInteger] = sa.BigInteger().with_variant(sa.INTEGER(), "sqlite")
FLOAT64: Final[sa.Double[float]] = sa.Double().with_variant(sa.REAL(), "sqlite")

_SQLITE_DEFAULT = "fedvault_sqlite_default"
# The timestamp every SQLite file defaults to (the format ``_now()`` helpers write).
SQLITE_NOW: Final = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"


def sqlite_default(expression: str) -> dict[str, Any]:
    """``Column(info=...)`` for a DEFAULT that only SQLite files declare.

    PostgreSQL tables never had these defaults (the stores always write the
    value), so ``server_default`` — which both dialects would get — does not fit.
    """
    return {_SQLITE_DEFAULT: expression}


@compiles(CreateColumn, "sqlite")
def _sqlite_column(create: CreateColumn, compiler: DDLCompiler, **kw: Any) -> str | None:
    text: str | None = compiler.visit_create_column(create, **kw)  # type: ignore[no-untyped-call]
    default = create.element.info.get(_SQLITE_DEFAULT)
    if text is None or default is None:
        return text
    if create.element.server_default is not None:
        raise sa.exc.ArgumentError(f"{create.element} has two defaults")
    return f"{text} DEFAULT ({default})"


def key_column(name: str, type_: Any, *args: Any, **kw: Any) -> sa.Column[Any]:
    """A single-column primary key declared without NOT NULL, as SQLite files have it.

    ``key TEXT PRIMARY KEY``: SQLite's legacy rule lets such a column hold
    NULL (an ``INTEGER PRIMARY KEY`` is the rowid and never does), and files
    created before keep that rule, so new ones do too. PostgreSQL makes every
    primary key column NOT NULL regardless. Not for an IDENTITY column, which
    PostgreSQL refuses to declare NULL.
    """
    return sa.Column(name, type_, *args, primary_key=True, nullable=True, **kw)


_APPEND_ONLY = "fedvault_append_only"


def append_only(table: sa.Table) -> sa.Table:
    """Mark ``table`` append-only: :func:`create_tables` gives it triggers refusing
    UPDATE and DELETE (SQLite) or UPDATE, DELETE and TRUNCATE (PostgreSQL)."""
    table.info[_APPEND_ONLY] = True
    return table


PG_APPEND_ONLY_FUNCTION = """
CREATE OR REPLACE FUNCTION fedvault_append_only() RETURNS trigger AS $$
BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$ LANGUAGE plpgsql;
"""


def _pg_append_only_statements(table: str) -> list[str]:
    """Make ``table`` reject UPDATE, DELETE and TRUNCATE (PostgreSQL ≥ 14)."""
    return [
        PG_APPEND_ONLY_FUNCTION,
        f"CREATE OR REPLACE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION fedvault_append_only()",
        f"CREATE OR REPLACE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION fedvault_append_only()",
    ]


# Idempotent, so they run on every open (a dropped trigger comes back), not
# only when the table is created.
_APPEND_ONLY_DDL: dict[str, Callable[[str], list[str]]] = {
    "sqlite": append_only_trigger_statements,
    "postgresql": _pg_append_only_statements,
}


def create_tables(conn: sa.Connection, metadata: sa.MetaData) -> None:
    """Create what is missing of ``metadata``'s tables, indexes and append-only triggers.

    SQLite: ``CREATE … IF NOT EXISTS`` in declaration order (safe when two
    processes create a new file at once). PostgreSQL: ``create_all`` (the
    caller holds the advisory lock).
    """
    dialect = conn.dialect.name
    if dialect == "postgresql":
        metadata.create_all(conn)
    for table in metadata.tables.values():
        if dialect != "postgresql":
            conn.execute(CreateTable(table, if_not_exists=True))
            for index in sorted(table.indexes, key=lambda i: str(i.name)):
                conn.execute(CreateIndex(index, if_not_exists=True))
        if table.info.get(_APPEND_ONLY):
            for statement in _APPEND_ONLY_DDL[dialect](table.name):
                conn.execute(sa.text(statement))


def add_columns(conn: sa.Connection, columns: list[sa.Column[Any]]) -> None:
    """``ALTER TABLE … ADD COLUMN`` each of ``columns`` its table lacks.

    For columns added after a table's first release: databases created before
    gain them on open; the column's declaration is the one in its ``Table``.
    """
    inspector = sa.inspect(conn)
    for column in columns:
        table = column.table
        if column.name not in {c["name"] for c in inspector.get_columns(table.name)}:
            spec = CreateColumn(column).compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {spec}"))
            inspector.clear_cache()


def insert_if_absent(conn: sa.Connection, table: sa.Table, values: dict[str, Any]) -> None:
    """Insert ``values`` unless the row conflicts with one already there."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        conn.execute(pg_insert(table).values(**values).on_conflict_do_nothing())
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        conn.execute(sqlite_insert(table).values(**values).on_conflict_do_nothing())
