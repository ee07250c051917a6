"""API keys and the gateway's own small state (default model versions), in SQLite.

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
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from fedvault.errors import (
    AuthenticationError,
    ConfigError,
    NotFoundError,
)
from fedvault.sqlite import connect, transaction

__all__ = ["ROLES", "ApiKey", "GatewayStore", "KeyVerifier", "parse_expiry"]

ROLES: Final = ("admin", "analyst", "partner", "auditor")
TOKEN_PREFIX: Final = "fvk_"  # noqa: S105 - a format prefix, not a secret
_TOKEN_RE = re.compile(r"^fvk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})$")
# scrypt cost: N=2^14, r=8 (16 MiB, ~40 ms here) — verified once per token per TTL.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "maxmem": 64 * 1024**2, "dklen": 32}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    models TEXT NOT NULL,
    partner TEXT,
    description TEXT NOT NULL DEFAULT '',
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS key_revocations (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL
);
INSERT OR IGNORE INTO key_revocations (id, generation) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS model_defaults (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    set_by TEXT NOT NULL,
    set_at REAL NOT NULL
);
"""


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
    match = re.fullmatch(r"(\d+)([dhm])", text)
    if match:
        unit = {"d": 86400, "h": 3600, "m": 60}[match.group(2)]
        return now + int(match.group(1)) * unit
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--expires must be like 30d, 12h, 90m or ISO 8601, not {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _hash(token: str, salt: bytes) -> bytes:
    return hashlib.scrypt(token.encode(), salt=salt, **_SCRYPT)


class GatewayStore:
    """API keys and default versions; one connection shared under a lock.

    The lock (not ``check_same_thread``) serialises use because lookups happen
    on the event loop thread and on worker threads alike.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = connect(path, check_same_thread=False)
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

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
        key_id = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        salt = secrets.token_bytes(16)
        digest = _hash(token, salt)  # outside the lock: the event loop reads under it
        now = time.time()
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "INSERT INTO api_keys (key_id, role, models, partner, description, salt, hash, "
                "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    role,
                    json.dumps(sorted(models)),
                    partner,
                    description,
                    salt,
                    digest,
                    now,
                    expires_at,
                ),
            )
        return token, self.key(key_id)

    def key(self, key_id: str) -> ApiKey:
        with self._lock:
            row = self._conn.execute("SELECT * FROM api_keys WHERE key_id=?", (key_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no API key {key_id[:32]!r}")
        return _key(row)

    def keys(self) -> list[ApiKey]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
        return [_key(r) for r in rows]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke ``key_id``; every verifier on this database refuses it from its next request."""
        self.key(key_id)
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "UPDATE api_keys SET revoked_at=COALESCE(revoked_at, ?) WHERE key_id=?",
                (time.time(), key_id),
            )
            self._conn.execute(
                "UPDATE key_revocations SET generation = generation + 1 WHERE id = 1"
            )
        return self.key(key_id)

    def revocation_generation(self) -> int:
        """How many revocations this database has seen: cheap enough for every request."""
        with self._lock:
            row = self._conn.execute(
                "SELECT generation FROM key_revocations WHERE id = 1"
            ).fetchone()
        return 0 if row is None else int(row[0])

    def check_token(self, token: str) -> ApiKey:
        """The key ``token`` belongs to, after the slow hash matched; else AuthenticationError."""
        match = _TOKEN_RE.match(token)
        if match is None:
            raise AuthenticationError("malformed API key")
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM api_keys WHERE key_id=?", (match.group(1),)
            ).fetchone()
        if row is None:
            _hash(token, b"\0" * 16)  # same cost whether or not the id exists
            raise AuthenticationError("unknown or wrong API key")
        if not hmac.compare_digest(_hash(token, row["salt"]), row["hash"]):
            raise AuthenticationError("unknown or wrong API key")
        return _key(row)

    # --------------------------------------------------------------- defaults
    def default_version(self, name: str) -> str | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT version FROM model_defaults WHERE name=?", (name,)
            ).fetchone()
        return None if row is None else str(row["version"])

    def set_default_version(self, name: str, version: str, *, actor: str) -> None:
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "INSERT INTO model_defaults (name, version, set_by, set_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET version=excluded.version, "
                "set_by=excluded.set_by, set_at=excluded.set_at",
                (name, version, actor, time.time()),
            )


def _key(row: sqlite3.Row) -> ApiKey:
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
        """Slow path (run it off the event loop): scrypt, then cache the verdict."""
        digest = hashlib.sha256(token.encode()).digest()
        generation = self._store.revocation_generation()
        try:
            key: ApiKey | None = self._store.check_token(token)
        except AuthenticationError:
            key = None
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[digest] = (self._clock() + self._ttl, key, generation)
        return self.check_live(key)

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
