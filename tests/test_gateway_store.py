"""server.gateway.keys.GatewayStore on SQLite and a real PostgreSQL, one or many replicas.

Replicas behind a load balancer are modelled as separate GatewayStore (and
KeyVerifier) instances on one database: what one creates, revokes or rolls
back, the others must see — revocations within the documented bound
(``generation_ttl_s``: every request on SQLite, 1 s by default on PostgreSQL).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedvault.errors import AuthenticationError, ConfigError, NotFoundError, UnavailableError
from server.gateway.keys import GatewayStore, KeyVerifier
from tests.audit_support import fetch_value


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
    with pytest.raises(UnavailableError, match="password file"):
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
