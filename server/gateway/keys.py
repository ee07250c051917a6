"""API keys and the gateway's own small state (default model versions), in SQLite or PostgreSQL.

A key is ``fvk_<key id>_<secret>``: the 12-hex-digit key id is a public
lookup handle (it appears in audit records and ``keys list``), the secret is
256 random bits. Only ``scrypt(token, salt)`` is stored, so a copy of the
database does not let anyone call the gateway. Why scrypt although the secret
is random: defence in depth the issue asks for (a weak custom token imported
by an operator is still protected), and its cost is paid once per token per
process — :class:`KeyVerifier` caches the verdict for ``cache_ttl_s`` keyed by
SHA-256 of the token, so the request path is one hash and one dict lookup.

Revocation is immediate, from any process: every revocation bumps a
generation counter (one row) in the same transaction, and the verifier reads
that row on every request (an indexed single-row read, ~10 µs). A cached
verdict older than the current generation is refreshed from the key's row —
a primary-key read, not scrypt — so ``fedvault keys revoke`` run beside a
live gateway (another process, another connection) is honoured by the next
request, while the slow hash is still paid once per token per TTL.

On PostgreSQL (gateway replicas behind a load balancer sharing one database)
the same holds across hosts with one bound: a replica re-reads the generation
at most every ``generation_ttl_s`` (default 1 s) instead of on every request,
so the event loop does not wait on a network round trip per call. A key
revoked through one replica (or ``fedvault keys revoke``) is refused by every
other replica within that bound — and immediately by the replica that
revoked it. Keys created anywhere are visible everywhere at once (the first
use of a token reads its row).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa

from fedvault.database import (
    FLOAT64,
    INT64,
    create_tables,
    insert_if_absent,
    key_column,
    open_database,
)
from fedvault.errors import (
    AuthenticationError,
    ConfigError,
    NotFoundError,
    UnavailableError,
)
from fedvault.sqlite import connect

__all__ = ["ROLES", "ApiKey", "GatewayStore", "KeyVerifier", "parse_expiry", "tables"]

ROLES: Final = ("admin", "analyst", "partner", "auditor")
MAX_KEY_LIFETIME_S: Final = 100 * 365.25 * 86400
# A model grant: a registry model name or '*'; a partner: a federation partner name.
_GRANT_RE = re.compile(r"\*|[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PARTNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{12}")
TOKEN_PREFIX: Final = "fvk_"  # noqa: S105 - a format prefix, not a secret
_TOKEN_RE = re.compile(r"^fvk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})$")
# scrypt cost: N=2^14, r=8 (16 MiB, ~40 ms here) — verified once per token per TTL.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "maxmem": 64 * 1024**2, "dklen": 32}

# The schema, for both dialects (on SQLite, the DDL its files have always had).
_meta = sa.MetaData()
_api_keys = sa.Table(
    "api_keys",
    _meta,
    key_column("key_id", sa.Text),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("models", sa.Text, nullable=False),
    sa.Column("partner", sa.Text),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("salt", sa.LargeBinary, nullable=False),
    sa.Column("hash", sa.LargeBinary, nullable=False),
    sa.Column("created_at", FLOAT64, nullable=False),
    sa.Column("expires_at", FLOAT64),
    sa.Column("revoked_at", FLOAT64),
)
_revocations = sa.Table(
    "key_revocations",
    _meta,
    # One row (id 1): SQLite's INTEGER PRIMARY KEY, PostgreSQL's SERIAL.
    key_column("id", sa.Integer, sa.CheckConstraint("id = 1")),
    sa.Column("generation", INT64, nullable=False),
)
_defaults = sa.Table(
    "model_defaults",
    _meta,
    key_column("name", sa.Text),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("set_by", sa.Text, nullable=False),
    sa.Column("set_at", FLOAT64, nullable=False),
)
_GENERATION = sa.select(_revocations.c.generation).where(_revocations.c.id == 1)


def _schema(conn: sa.Connection) -> None:
    create_tables(conn, _meta)
    insert_if_absent(conn, _revocations, {"id": 1, "generation": 0})


def tables() -> list[sa.Table]:
    """The store's tables (API keys, the revocation counter, default versions).

    Public for tools that copy the store row for row (``fedvault store
    migrate``, :mod:`server.migrate`) through the store's own declarations.
    """
    return list(_meta.sorted_tables)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What the gateway knows about a key (never the secret)."""

    key_id: str
    role: str
    models: frozenset[str]  # model names granted; "*" = all
    partner: str | None
    description: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def public(self) -> dict[str, Any]:
        def iso(t: float | None) -> str | None:
            return None if t is None else datetime.fromtimestamp(t, UTC).isoformat()

        return {
            "key_id": self.key_id,
            "role": self.role,
            "models": sorted(self.models),
            "partner": self.partner,
            "description": self.description,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked": self.revoked_at is not None,
        }


def parse_expiry(text: str | None, now: float | None = None) -> float | None:
    """``30d``, ``12h``, ``90m`` or an ISO-8601 instant → epoch seconds (None: never)."""
    if text is None or text == "":
        return None
    now = time.time() if now is None else now
    match = re.fullmatch(r"(\d{1,12})([dhm])", text)
    if match:
        unit = {"d": 86400, "h": 3600, "m": 60}[match.group(2)]
        return check_expiry(now + int(match.group(1)) * unit, now)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--expires must be like 30d, 12h, 90m or ISO 8601, not {text[:40]!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return check_expiry(when.timestamp(), now)


def check_expiry(
    expires_at: float | None, now: float | None = None, *, past_ok: bool = False
) -> float | None:
    """Refuse an expiry beyond :data:`MAX_KEY_LIFETIME_S` (or in the past, unless ``past_ok``).

    Why a ceiling: an instant past year 9999 was stored, and from then on
    every listing of the keys failed (no date can show it). A key meant to
    live for ever is made without ``--expires``. A past expiry is a typo at
    the CLI or API; the store itself still takes one (tests of expiry do).
    """
    if expires_at is None:
        return None
    now = time.time() if now is None else now
    if not math.isfinite(expires_at) or expires_at > now + MAX_KEY_LIFETIME_S:
        raise ConfigError(
            "--expires is at most 100 years ahead; leave it out for a key that never expires"
        )
    if expires_at <= now and not past_ok:
        raise ConfigError("--expires is in the past: the key would be expired already")
    return expires_at


def _hash(token: str, salt: bytes) -> bytes:
    return hashlib.scrypt(token.encode(), salt=salt, **_SCRYPT)


class GatewayStore:
    """API keys and default versions, in a SQLite file or a PostgreSQL database.

    Connections come from a pool (thread-safe), because lookups happen on the
    event loop thread and on worker threads alike. ``generation_ttl_s`` bounds
    how stale :meth:`revocation_generation` may be: 0 (the SQLite default)
    reads it every time; PostgreSQL defaults to 1 s (see the module docstring).
    """

    def __init__(
        self,
        location: str | Path,
        *,
        password_file: Path | None = None,
        generation_ttl_s: float | None = None,
    ) -> None:
        self.path = location if isinstance(location, Path) else Path(str(location))
        self.location = str(location)
        self._db = open_database(
            location,
            what="gateway",
            password_file=password_file,
            schema=_schema,
        )
        if generation_ttl_s is None:
            generation_ttl_s = 1.0 if self._db.postgres else 0.0
        self.generation_ttl_s = generation_ttl_s
        self._generation: tuple[float, int] | None = None  # (monotonic read time, value)
        self._defaults_cache: dict[str, tuple[float, str | None]] = {}
        # The per-request queries (generation, default version) on SQLite: a
        # dedicated raw connection under a lock costs ~5 µs where a pooled
        # SQLAlchemy round costs ~50 µs on the event loop. (PostgreSQL amortises
        # them with generation_ttl_s instead.)
        self._hot: sqlite3.Connection | None = None
        self._hot_lock = threading.Lock()
        if not self._db.postgres:
            self._hot = connect(self.path, check_same_thread=False)

    def close(self) -> None:
        with self._hot_lock:
            if self._hot is not None:
                self._hot.close()
                self._hot = None
        self._db.close()

    # ------------------------------------------------------------------- keys
    def create_key(
        self,
        role: str,
        *,
        models: frozenset[str] = frozenset(),
        partner: str | None = None,
        expires_at: float | None = None,
        description: str = "",
    ) -> tuple[str, ApiKey]:
        """A new key: ``(token, record)``. The token is shown once and never stored."""
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if role == "partner" and not partner:
            raise ConfigError("a partner key needs --partner NAME (whose runs it may read)")
        if role == "analyst" and not models:
            raise ConfigError(
                "an analyst key needs at least one --model NAME grant (or --model '*')"
            )
        bad = sorted(m for m in models if not _GRANT_RE.fullmatch(m))
        if bad:
            raise ConfigError(
                f"--model {bad[0][:40]!r} is not a model name (letters, digits, '.', '_', '-') "
                "or '*'"
            )
        if partner is not None and not _PARTNER_RE.fullmatch(partner):
            raise ConfigError(
                f"--partner {partner[:40]!r} is not a partner name (letters, digits, '_', '-')"
            )
        check_expiry(expires_at, past_ok=True)
        key_id = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        salt = secrets.token_bytes(16)
        digest = _hash(token, salt)
        with self._db.write() as conn:
            conn.execute(
                _api_keys.insert().values(
                    key_id=key_id,
                    role=role,
                    models=json.dumps(sorted(models)),
                    partner=partner,
                    description=description,
                    salt=salt,
                    hash=digest,
                    created_at=time.time(),
                    expires_at=expires_at,
                )
            )
        return token, self.key(key_id)

    def _row(self, key_id: str) -> sa.RowMapping | None:
        with self._db.read() as conn:
            row = conn.execute(sa.select(_api_keys).where(_api_keys.c.key_id == key_id)).first()
        return None if row is None else row._mapping

    def key(self, key_id: str) -> ApiKey:
        if not _KEY_ID_RE.fullmatch(key_id):
            # Not an id: never quoted, since a pasted token would put its secret
            # part in the message (and the terminal's scrollback, and the logs).
            what = "a token (a secret)" if _TOKEN_RE.match(key_id) else "not a key id"
            raise NotFoundError(
                f"that is {what}; keys are named by their 12-hex-digit id (fedvault keys list)"
            )
        row = self._row(key_id)
        if row is None:
            raise NotFoundError(f"no API key {key_id!r}")
        return _key(row)

    def keys(self) -> list[ApiKey]:
        with self._db.read() as conn:
            rows = conn.execute(sa.select(_api_keys).order_by(_api_keys.c.created_at)).all()
        return [_key(r._mapping) for r in rows]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke ``key_id``; every verifier on this database refuses it (see the bound above)."""
        self.key(key_id)
        with self._db.write() as conn:
            conn.execute(
                _api_keys.update()
                .where(_api_keys.c.key_id == key_id)
                .values(revoked_at=sa.func.coalesce(_api_keys.c.revoked_at, time.time()))
            )
            conn.execute(
                _revocations.update()
                .where(_revocations.c.id == 1)
                .values(generation=_revocations.c.generation + 1)
            )
        self._generation = None  # this process sees its own revocation at once
        return self.key(key_id)

    def revocation_generation(self) -> int:
        """How many revocations this database has seen: cheap enough for every request.

        Read at most every ``generation_ttl_s`` (0: every call).
        """
        if self._hot is not None and self.generation_ttl_s <= 0:
            row = self._hot_read("SELECT generation FROM key_revocations WHERE id = 1", ())
            return 0 if row is None else int(row[0])
        now = time.monotonic()
        cached = self._generation
        if cached is not None and now - cached[0] < self.generation_ttl_s:
            return cached[1]
        with self._db.read() as conn:
            value = conn.execute(_GENERATION).scalar()
        generation = 0 if value is None else int(value)
        if self.generation_ttl_s > 0:
            self._generation = (now, generation)
        return generation

    def _hot_read(self, sql: str, args: tuple[str, ...]) -> tuple[Any, ...] | None:
        """One row through the dedicated SQLite connection (the request path's reads)."""
        with self._hot_lock:
            if self._hot is None:
                raise UnavailableError("gateway store is closed")
            try:
                row = self._hot.execute(sql, args).fetchone()
            except sqlite3.Error as exc:
                raise UnavailableError(f"gateway database error: {exc}") from None
        return None if row is None else tuple(row)

    def check_token(self, token: str) -> ApiKey:
        """The key ``token`` belongs to, after the slow hash matched; else AuthenticationError."""
        match = _TOKEN_RE.match(token)
        if match is None:
            raise AuthenticationError("malformed API key")
        row = self._row(match.group(1))
        if row is None:
            _hash(token, b"\0" * 16)  # same cost whether or not the id exists
            raise AuthenticationError("unknown or wrong API key")
        if not hmac.compare_digest(_hash(token, bytes(row["salt"])), bytes(row["hash"])):
            raise AuthenticationError("unknown or wrong API key")
        return _key(row)

    # --------------------------------------------------------------- defaults
    def default_version(self, name: str) -> str | None:
        """The admin's chosen default for ``name`` (None: newest), read per request.

        Fresh on SQLite; on PostgreSQL at most ``generation_ttl_s`` old, so a
        rollback through one replica reaches the others within the same bound
        as a revocation.
        """
        if self._hot is not None and self.generation_ttl_s <= 0:
            row = self._hot_read("SELECT version FROM model_defaults WHERE name=?", (name,))
            return None if row is None else str(row[0])
        now = time.monotonic()
        cached = self._defaults_cache.get(name)
        if cached is not None and now - cached[0] < self.generation_ttl_s:
            return cached[1]
        with self._db.read() as conn:
            value = conn.execute(
                sa.select(_defaults.c.version).where(_defaults.c.name == name)
            ).scalar()
        version = None if value is None else str(value)
        if self.generation_ttl_s > 0:
            self._defaults_cache[name] = (now, version)
        return version

    def set_default_version(self, name: str, version: str, *, actor: str) -> None:
        with self._db.write() as conn:
            conn.execute(
                self._db.insert_or_update(
                    _defaults,
                    {"name": name, "version": version, "set_by": actor, "set_at": time.time()},
                    ["name"],
                )
            )
        self._defaults_cache.pop(name, None)


def _key(row: sa.RowMapping) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"],
        role=row["role"],
        models=frozenset(json.loads(row["models"])),
        partner=row["partner"],
        description=row["description"],
        created_at=float(row["created_at"]),
        expires_at=None if row["expires_at"] is None else float(row["expires_at"]),
        revoked_at=None if row["revoked_at"] is None else float(row["revoked_at"]),
    )


class KeyVerifier:
    """Token → :class:`ApiKey`, with the slow hash paid once per token per TTL.

    The cache is keyed by SHA-256 of the token (the token itself is never
    held as a key) and also remembers failures briefly, so a flood of one
    wrong token costs one scrypt per TTL, not one per request. Each entry
    remembers the revocation generation it was read under (read *before* the
    key row, so a revocation racing the read leaves the entry stale, never
    wrongly fresh); :meth:`cached` re-reads the key's row when the store's
    generation has moved on.
    """

    def __init__(
        self,
        store: GatewayStore,
        *,
        cache_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._ttl = cache_ttl_s
        self._clock = clock
        self._wall = wall
        # digest -> (expires at, key or None for a wrong token, revocation generation)
        self._cache: dict[bytes, tuple[float, ApiKey | None, int]] = {}
        # digest -> the verdict being computed now (see verify: single flight)
        self._inflight: dict[bytes, Future[ApiKey | None]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> tuple[bool, ApiKey | None]:
        """(hit, key) without scrypt: the fast path the event loop may call.

        Costs one single-row read of the revocation generation per request,
        plus one primary-key read after a revocation anywhere.
        """
        digest = hashlib.sha256(token.encode()).digest()
        entry = self._cache.get(digest)
        if entry is None or entry[0] < self._clock():
            return False, None
        expires, key, generation = entry
        if key is None:
            return True, None
        current = self._store.revocation_generation()
        if generation != current:
            try:
                key = self._store.key(key.key_id)
            except NotFoundError:
                key = None
            with self._lock:
                self._cache[digest] = (expires, key, current)
        return True, key

    def verify(self, token: str) -> ApiKey:
        """Slow path (run it off the event loop): scrypt, then cache the verdict.

        Single-flight per token: when many requests present the same token on
        a cold cache at once (a client fleet restarting, a burst after the TTL
        expires), the first caller computes scrypt and the others wait for its
        verdict instead of each burning ~40 ms of CPU on an identical hash.
        The in-flight map is keyed by the same SHA-256 digest as the cache, so
        the token itself is never held; an error (e.g. the database being
        unavailable) reaches every waiter and is not cached. Different tokens
        never wait on each other.
        """
        digest = hashlib.sha256(token.encode()).digest()
        with self._lock:
            pending = self._inflight.get(digest)
            leader = pending is None
            if pending is None:
                pending = self._inflight[digest] = Future()
        if not leader:
            return self.check_live(pending.result())
        try:
            key = self._check(digest, token)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set_result(key)
        finally:
            with self._lock:
                del self._inflight[digest]
        return self.check_live(key)

    def _check(self, digest: bytes, token: str) -> ApiKey | None:
        """Scrypt once and cache the verdict (None: wrong token) — the single flight itself."""
        generation = self._store.revocation_generation()
        try:
            key: ApiKey | None = self._store.check_token(token)
        except AuthenticationError:
            key = None
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[digest] = (self._clock() + self._ttl, key, generation)
        return key

    def check_live(self, key: ApiKey | None) -> ApiKey:
        """Refuse unknown, revoked and expired keys (all the same 401 to the caller)."""
        if key is None:
            raise AuthenticationError("unknown or wrong API key")
        if key.revoked_at is not None:
            raise AuthenticationError("API key revoked")
        if key.expires_at is not None and key.expires_at <= self._wall():
            raise AuthenticationError("API key expired")
        return key

    def forget(self, key_id: str) -> None:
        """Drop cached verdicts of ``key_id`` (after a revocation in this process)."""
        with self._lock:
            for digest in [d for d, (_, k, _g) in self._cache.items() if k and k.key_id == key_id]:
                del self._cache[digest]
