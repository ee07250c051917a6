"""Two gateway replicas on one PostgreSQL, with no shared directory: the scale-out path.

Each replica is a full ``build_gateway`` (repository, keys, audit) served over
HTTP, configured with nothing but the database URL and the model keys — its
registry directory does not exist. What one replica does (create a key, revoke
it, roll a model back) the other honours; a model tampered with in the
database is refused by both at load.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from secure.signed_note import NoteSigner, generate_note_key
from server.audit.log import AuditLog
from server.audit.storage import open_storage
from server.gateway.rest import GatewayApp
from server.registry import ModelRegistry, ensure_model_keys, load_model_keys
from server.store import FederationStore
from tests.audit_support import fresh_database, run_sql
from tests.gateway_support import LINEAGE, MODEL, TAMPERED, database_replica
from tests.he_support import trained

INFER = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0] * 30}]}
Pair = tuple[tuple[GatewayApp, httpx.Client], tuple[GatewayApp, httpx.Client]]
BOUND_S = 0.3  # generation_ttl_s of the replicas below (production default: 1 s)


@pytest.fixture(scope="module")
def database(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A PostgreSQL registry with MODEL v1, v2 and a TAMPERED v1 (blob altered in the DB)."""
    url = fresh_database(pg_admin, "gateway_replicas")
    keys_dir = tmp_path_factory.mktemp("keys") / "keys"
    ensure_model_keys(keys_dir)
    with FederationStore(url) as store:
        store.create_run("run-gw", {}, {})
        registry = ModelRegistry(store, None, load_model_keys(keys_dir))
        spec, params, scaler = trained("breast-cancer", "logreg")
        for version in (1, 2):
            scaled = [p * (1.0 if version == 2 else 0.5) for p in params]
            registry.register(
                name=MODEL,
                run_id="run-gw",
                spec=spec,
                params=scaled,
                scaler=scaler,
                lineage=LINEAGE,
            )
        tampered = registry.register(
            name=TAMPERED, run_id="run-gw", spec=spec, params=params, scaler=scaler, lineage=LINEAGE
        )
    run_sql(
        url,
        "UPDATE models SET artifact_blob = overlay(artifact_blob placing "
        "'\\xff'::bytea from octet_length(artifact_blob) - 9) WHERE model_id = %s",
        (tampered,),
    )
    return url, keys_dir


def _replica(
    url: str, keys_dir: Path, tmp: Path, stack: ExitStack, audit_key: NoteSigner
) -> tuple[GatewayApp, str]:
    # One audit signing key for all replicas, as deployed (docs/deployment.md):
    # a replica whose key did not sign the store's checkpoints refuses to start.
    log = AuditLog(open_storage(url), audit_key)
    stack.callback(log.close)
    gw, base = database_replica(url, keys_dir, tmp, log, stack)
    gw.store.generation_ttl_s = BOUND_S
    return gw, base


@pytest.fixture(scope="module")
def replicas(
    database: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    url, keys_dir = database
    tmp = tmp_path_factory.mktemp("replicas")
    audit_key = generate_note_key("test/replica-audit")
    with ExitStack() as stack:
        out = []
        for _ in range(2):
            gw, base = _replica(url, keys_dir, tmp, stack, audit_key)
            out.append((gw, stack.enter_context(httpx.Client(base_url=base, timeout=30))))
        yield out[0], out[1]
    assert not (tmp / "no-such-registry").exists()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_both_replicas_serve_the_registry_from_the_database(replicas: Pair) -> None:
    for gw, _client in replicas:
        index = {(e["name"], e["version"]): e for e in gw.service.repository.index()}
        assert index[(MODEL, "1")]["state"] == "READY"
        assert index[(MODEL, "2")]["state"] == "READY"
        assert index[(TAMPERED, "1")]["state"] == "UNAVAILABLE"
        assert index[(TAMPERED, "1")]["reason"] == "IntegrityError"


def test_a_key_from_one_replica_works_on_the_other_until_revoked(replicas: Pair) -> None:
    (gw_a, client_a), (_gw_b, client_b) = replicas
    token, key = gw_a.store.create_key("analyst", models=frozenset({MODEL}))
    infer = f"/v2/models/{MODEL}/infer"
    assert client_b.post(infer, json=INFER, headers=_auth(token)).status_code == 200
    assert client_a.post(infer, json=INFER, headers=_auth(token)).status_code == 200
    revoked_at = time.monotonic()
    gw_a.store.revoke(key.key_id)
    assert client_a.post(infer, json=INFER, headers=_auth(token)).status_code == 401  # at once
    while client_b.post(infer, json=INFER, headers=_auth(token)).status_code != 401:
        assert time.monotonic() - revoked_at < BOUND_S + 2.0, "revocation not honoured in bound"
        time.sleep(0.05)


def test_a_rollback_on_one_replica_reaches_the_other(replicas: Pair) -> None:
    (gw_a, _client_a), (gw_b, _client_b) = replicas
    assert gw_b.service.repository.default_version(MODEL) == "2"
    gw_a.service.repository.rollback(MODEL, None, actor="admin")
    deadline = time.monotonic() + BOUND_S + 2.0
    while gw_b.service.repository.default_version(MODEL) != "1":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    gw_a.service.repository.rollback(MODEL, "2", actor="admin")
