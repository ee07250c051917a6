"""Every gateway request is in the audit log before its response leaves; fail closed otherwise."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import httpx
import pytest

from server.audit.records import AuditRecord, decode_entry
from server.gateway.rest import create_rest_app
from tests.gateway_support import MODEL, Harness, build, features
from tests.he_support import live_server


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("gw-audit"))
    yield h
    h.log.close()


@pytest.fixture(scope="module")
def url(harness: Harness) -> Iterator[str]:
    with live_server(create_rest_app(harness.gw)) as base:
        yield base


def _last(h: Harness) -> AuditRecord:
    size = h.log.size()
    ((_, entry),) = h.log.entries(size - 1, size)
    return decode_entry(entry)


def test_infer_is_audited_with_digests_not_data(harness: Harness, url: str) -> None:
    x = features(2)
    body = json.dumps(
        {"inputs": [{"name": "features", "shape": [2, 30], "datatype": "FP32", "data": x.tolist()}]}
    ).encode()
    token = harness.tokens["analyst"]
    r = httpx.post(
        f"{url}/v2/models/{MODEL}/infer",
        content=body,
        headers={"Authorization": f"Bearer {token}", "x-request-id": "req-42"},
    )
    assert r.status_code == 200
    rec = _last(harness)
    key_id = token.split("_")[1]
    assert rec.actor == f"key:{key_id}"
    assert rec.peer is not None
    assert rec.peer.startswith("127.0.0.1:")
    assert rec.mtls_subject is None
    assert rec.role == "analyst"
    assert rec.action == "rest:infer"
    assert rec.protocol == "rest"
    assert rec.resource == f"model:{MODEL}/2"
    assert (rec.outcome, rec.status, rec.error_type) == ("ok", "200", None)
    assert rec.latency_ms is not None
    assert 0 < rec.latency_ms < 30_000
    assert rec.request_id == "req-42"
    assert rec.request_digest == hashlib.sha256(body).hexdigest()
    assert rec.response_digest == hashlib.sha256(r.content).hexdigest()
    raw = json.dumps(rec.to_json_dict())
    assert token not in raw
    assert str(float(x[0, 0])) not in raw
    assert r.headers["x-request-id"] == "req-42"


def test_denied_and_unauthenticated_are_audited(harness: Harness, url: str) -> None:
    httpx.post(
        f"{url}/v2/models/{MODEL}/infer",
        json={"inputs": []},
        headers={"Authorization": f"Bearer {harness.tokens['auditor']}"},
    )
    rec = _last(harness)
    assert rec.role == "auditor"
    assert (rec.outcome, rec.status) == ("denied", "403")
    assert rec.error_type == "urn:fedvault:problem:permission-denied"
    httpx.get(f"{url}/v2", headers={"Authorization": "Bearer fvk_nope"})
    rec = _last(harness)
    assert rec.actor == "anonymous"
    assert rec.role == "none"
    assert (rec.outcome, rec.status) == ("denied", "401")
    assert rec.error_type == "urn:fedvault:problem:authentication"
    httpx.get(f"{url}/v9/unknown")
    rec = _last(harness)
    assert (rec.outcome, rec.status, rec.error_type) == (
        "error",
        "404",
        "urn:fedvault:problem:not-found",
    )


def test_health_probes_are_not_audited(harness: Harness, url: str) -> None:
    size = harness.log.size()
    httpx.get(f"{url}/v2/health/live")
    httpx.get(f"{url}/v2/health/ready")
    assert harness.log.size() == size


def test_audit_failure_fails_closed_and_unreadies(harness: Harness, url: str) -> None:
    auth = {"Authorization": f"Bearer {harness.tokens['analyst']}"}
    doc = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0] * 30}]}
    size = harness.log.size()
    harness.sink.broken = True
    try:
        r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=doc, headers=auth)
        assert r.status_code == 503
        assert r.json()["type"] == "urn:fedvault:problem:unavailable"
        assert "outputs" not in r.text
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503
        assert harness.log.size() == size
        assert b"fedvault_audit_append_failures_total 1.0" in harness.gw.metrics.exposition()
    finally:
        harness.sink.broken = False
    assert httpx.post(f"{url}/v2/models/{MODEL}/infer", json=doc, headers=auth).status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def test_infer_fast_path_matches_the_routes(harness: Harness, url: str) -> None:
    """The ASGI fast path names the route like FastAPI would; what it declines still works."""
    auth = {"Authorization": f"Bearer {harness.tokens['analyst']}"}
    body = {
        "inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [1] * 30}]
    }
    r = httpx.post(f"{url}/v2/models/{MODEL}/versions/1/infer", json=body, headers=auth)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json()["model_version"] == "1"
    rec = _last(harness)
    assert (rec.action, rec.resource, rec.status) == (
        "rest:infer_version",
        f"model:{MODEL}/1",
        "200",
    )
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body)  # no key: 401, audited
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/problem+json")
    assert (_last(harness).action, _last(harness).status) == ("rest:infer", "401")
    r = httpx.post(f"{url}/v2/models/{'m' * 201}/infer", json=body, headers=auth)  # FastAPI's 400
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/problem+json")
    assert _last(harness).action == "rest:infer"
