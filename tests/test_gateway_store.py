"""server.gateway.keys.GatewayStore on SQLite and a real PostgreSQL, one or many replicas.

Replicas behind a load balancer are modelled as separate GatewayStore (and
KeyVerifier) instances on one database: what one creates, revokes or rolls
back, the others must see — revocations within the documented bound
(``generation_ttl_s``: every request on SQLite, 1 s by default on PostgreSQL).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedvault.errors import AuthenticationError, ConfigError, NotFoundError, UnavailableError
from server.gateway.keys import GatewayStore, KeyVerifier
from tests.audit_support import fetch_value, fresh_database
from tests.store_support import reflected_schema, sqlite_file_details


@pytest.fixture
def store(db_location: str) -> Iterator[GatewayStore]:
    s = GatewayStore(db_location)
    yield s
    s.close()


def test_key_lifecycle(store: GatewayStore) -> None:
    token, key = store.create_key("analyst", models=frozenset({"m"}), description="d")
    assert (key.role, key.models, key.description, key.revoked_at) == (
        "analyst",
        frozenset({"m"}),
        "d",
        None,
    )
    assert store.check_token(token) == key
    assert [k.key_id for k in store.keys()] == [key.key_id]
    with pytest.raises(AuthenticationError):
        store.check_token(token[:-2] + "xx")
    with pytest.raises(AuthenticationError, match="malformed"):
        store.check_token("nope")
    generation = store.revocation_generation()
    revoked = store.revoke(key.key_id)
    assert revoked.revoked_at is not None
    assert store.revocation_generation() == generation + 1
    assert store.revoke(key.key_id).revoked_at == revoked.revoked_at  # first time kept
    with pytest.raises(NotFoundError):
        store.key("000000000000")
    with pytest.raises(ConfigError):
        store.create_key("analyst")  # no model grant


def test_only_a_slow_hash_is_stored(store: GatewayStore, db_location: str) -> None:
    token, key = store.create_key("admin")
    stored = fetch_value(db_location, "SELECT hash FROM api_keys WHERE key_id = %s", (key.key_id,))
    assert isinstance(stored, bytes)
    assert len(stored) == 32
    assert token.encode() not in stored


def test_expiry_is_enforced_by_the_verifier(store: GatewayStore) -> None:
    token, _ = store.create_key("admin", expires_at=time.time() - 1)
    with pytest.raises(AuthenticationError, match="expired"):
        KeyVerifier(store).verify(token)


def test_replicas_see_each_others_keys_and_revocations(db_location: str) -> None:
    a = GatewayStore(db_location, generation_ttl_s=0.2)
    b = GatewayStore(db_location, generation_ttl_s=0.2)
    try:
        verifier_b = KeyVerifier(b, cache_ttl_s=60)
        token, key = a.create_key("analyst", models=frozenset({"m"}))
        assert verifier_b.verify(token).key_id == key.key_id  # created on a, known to b
        assert verifier_b.cached(token) == (True, b.key(key.key_id))
        a.revoke(key.key_id)
        # Within the bound (0.2 s here), b's cached verdict is re-read and refused.
        deadline = time.monotonic() + 0.2 + 1.0
        while True:
            hit, cached = verifier_b.cached(token)
            assert hit
            if cached is not None and cached.revoked_at is not None:
                break
            assert time.monotonic() < deadline, "revocation not seen within the bound"
            time.sleep(0.02)
        with pytest.raises(AuthenticationError, match="revoked"):
            verifier_b.check_live(cached)
        assert [k.key_id for k in b.keys()] == [key.key_id]
    finally:
        a.close()
        b.close()


def test_a_replica_sees_its_own_revocation_at_once(db_location: str) -> None:
    store = GatewayStore(db_location, generation_ttl_s=3600)
    try:
        verifier = KeyVerifier(store)
        token, key = store.create_key("admin")
        verifier.verify(token)
        store.revoke(key.key_id)
        hit, cached = verifier.cached(token)
        assert hit
        assert cached is not None
        assert cached.revoked_at is not None
    finally:
        store.close()


def test_default_versions_are_shared(db_location: str) -> None:
    a = GatewayStore(db_location, generation_ttl_s=0)
    b = GatewayStore(db_location, generation_ttl_s=0)
    try:
        assert b.default_version("m") is None
        a.set_default_version("m", "2", actor="admin")
        assert b.default_version("m") == "2"
        a.set_default_version("m", "1", actor="admin")  # a rollback
        assert b.default_version("m") == "1"
        assert a.default_version("m") == "1"
    finally:
        a.close()
        b.close()


def test_postgres_defaults_bound_staleness_to_one_second(db_location: str) -> None:
    store = GatewayStore(db_location)
    try:
        expected = 1.0 if db_location.startswith("postgresql") else 0.0
        assert store.generation_ttl_s == expected
    finally:
        store.close()


def test_a_password_in_the_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password") as info:
        GatewayStore("postgresql://fedvault:hunter2@127.0.0.1:1/fedvault")
    assert "hunter2" not in str(info.value)


def test_an_unreachable_database_does_not_echo_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t-value")
    with pytest.raises(UnavailableError) as info:
        GatewayStore(
            "postgresql://fedvault@127.0.0.1:1/fedvault?connect_timeout=2", password_file=secret
        )
    assert "s3cr3t-value" not in str(info.value)
    with pytest.raises(ConfigError, match="password file"):
        GatewayStore("postgresql://fedvault@127.0.0.1:1/x", password_file=tmp_path / "missing")


def test_the_password_goes_to_the_driver_not_into_the_url(pg_admin: str, tmp_path: Path) -> None:
    """A role of its own, a password file: the URL (which is logged) never holds the secret."""
    import psycopg

    from tests.audit_support import fresh_database

    url = fresh_database(pg_admin, "gateway_replica_role")
    plain = pg_admin.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS replica")
        conn.execute("CREATE ROLE replica LOGIN PASSWORD 'right-one'")
        conn.execute('ALTER DATABASE "gateway_replica_role" OWNER TO replica')
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t-value\n")
    # The test server trusts local roles, so the password is sent but not checked.
    store = GatewayStore(
        url.replace("postgres@", "replica@").replace("+psycopg", ""), password_file=secret
    )
    try:
        token, key = store.create_key("admin")
        assert store.check_token(token).key_id == key.key_id
        engine_url = store._db.engine.url
        assert "s3cr3t" not in str(engine_url)
        assert engine_url.password is None
        with pytest.raises(NotFoundError) as info:
            store.key("000000000000")
        assert "s3cr3t" not in str(info.value)
    finally:
        store.close()


def _counting_hash(
    monkeypatch: pytest.MonkeyPatch, delay_s: float = 0.3
) -> tuple[list[str], Callable[[str, bytes], bytes]]:
    """Wrap keys._hash: record each call (token) and hold it ``delay_s`` to widen the race."""
    from server.gateway import keys

    real = keys._hash
    calls: list[str] = []

    def counted(token: str, salt: bytes) -> bytes:
        calls.append(token)
        time.sleep(delay_s)
        return real(token, salt)

    monkeypatch.setattr(keys, "_hash", counted)
    return calls, real


def _verify_all(verifier: KeyVerifier, tokens: list[str]) -> list[object]:
    """verify(token) for each token in its own thread, all released at once: results or errors."""
    barrier = threading.Barrier(len(tokens))

    def one(token: str) -> object:
        barrier.wait()
        try:
            return verifier.verify(token)
        except AuthenticationError as exc:
            return exc

    with ThreadPoolExecutor(len(tokens)) as pool:
        return list(pool.map(one, tokens))


def test_concurrent_verifications_of_one_token_share_one_scrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = GatewayStore(tmp_path / "s.sqlite")
    try:
        token, key = store.create_key("analyst", models=frozenset({"m"}))
        calls, _ = _counting_hash(monkeypatch)
        verifier = KeyVerifier(store)
        results = _verify_all(verifier, [token] * 16)
        assert results == [key] * 16
        assert len(calls) == 1
        assert verifier._inflight == {}  # cleaned up, nothing of the token left behind
    finally:
        store.close()


def test_concurrent_wrong_token_fails_for_every_waiter_after_one_scrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = GatewayStore(tmp_path / "s.sqlite")
    try:
        token, _ = store.create_key("analyst", models=frozenset({"m"}))
        wrong = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
        calls, _ = _counting_hash(monkeypatch)
        verifier = KeyVerifier(store)
        results = _verify_all(verifier, [wrong] * 16)
        assert all(isinstance(r, AuthenticationError) for r in results)
        assert {str(r) for r in results} == {"unknown or wrong API key"}
        assert len(calls) == 1
        assert verifier._inflight == {}
    finally:
        store.close()


def test_an_error_reaches_every_waiter_and_is_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = GatewayStore(tmp_path / "s.sqlite")
    try:
        token, key = store.create_key("admin")
        real_check = store.check_token
        attempts: list[int] = []

        def failing(t: str) -> object:
            attempts.append(1)
            time.sleep(0.3)
            raise UnavailableError("gateway database error: down")

        monkeypatch.setattr(store, "check_token", failing)
        verifier = KeyVerifier(store)
        barrier = threading.Barrier(8)

        def one(_: int) -> str:
            barrier.wait()
            try:
                verifier.verify(token)
            except UnavailableError as exc:
                return str(exc)
            return "ok"

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(one, range(8))) == {"gateway database error: down"}
        assert len(attempts) == 1
        assert verifier.cached(token) == (False, None)  # the outage was not remembered
        monkeypatch.setattr(store, "check_token", real_check)
        assert verifier.verify(token) == key
    finally:
        store.close()


def test_different_tokens_are_not_serialised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token A's scrypt waits until token B's has finished: serialised, this would time out."""
    from server.gateway import keys

    store = GatewayStore(tmp_path / "s.sqlite")
    try:
        token_a, key_a = store.create_key("admin")
        token_b, key_b = store.create_key("admin")
        real = keys._hash
        b_done = threading.Event()

        def ordered(token: str, salt: bytes) -> bytes:
            if token == token_a:
                assert b_done.wait(5), "token A's verification blocked token B's"
                return real(token, salt)
            digest = real(token, salt)
            b_done.set()
            return digest

        monkeypatch.setattr(keys, "_hash", ordered)
        assert _verify_all(KeyVerifier(store), [token_a, token_b]) == [key_a, key_b]
    finally:
        store.close()


def test_sqlite_and_postgres_get_the_same_schema(tmp_path: Path, pg_admin: str) -> None:
    """One declaration serves both dialects: a column, key or check cannot be on one only."""
    lite, pg = str(tmp_path / "gateway.db"), fresh_database(pg_admin, "gateway_schema")
    for location in (lite, pg):
        GatewayStore(location).close()
    schema = reflected_schema(lite)
    assert sorted(schema["tables"]) == ["api_keys", "key_revocations", "model_defaults"]
    assert schema["tables"]["key_revocations"]["checks"] == ["id = 1"]
    assert reflected_schema(pg) == schema


# What SQLite key stores were created with while the schema was written out
# twice (raw DDL beside the SQLAlchemy tables), frozen here: such files must
# keep opening, with the schema a new file gets.
LEGACY_SQLITE_SCHEMA = """
CREATE TABLE api_keys (
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
CREATE TABLE key_revocations (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL
);
INSERT INTO key_revocations (id, generation) VALUES (1, 4);
CREATE TABLE model_defaults (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    set_by TEXT NOT NULL,
    set_at REAL NOT NULL
);
"""


def test_a_sqlite_file_from_the_raw_ddl_days_keeps_working(tmp_path: Path) -> None:
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    conn = sqlite3.connect(old)
    conn.executescript(LEGACY_SQLITE_SCHEMA)
    conn.close()
    GatewayStore(new).close()
    store = GatewayStore(old)
    try:
        assert store.revocation_generation() == 4  # the row there is kept, not re-seeded
        token, key = store.create_key("admin")
        assert KeyVerifier(store).verify(token) == key
        store.revoke(key.key_id)
        assert store.revocation_generation() == 5
    finally:
        store.close()
    assert reflected_schema(str(old)) == reflected_schema(str(new))
    assert sqlite_file_details(old) == sqlite_file_details(new)
