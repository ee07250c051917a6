"""The REST API over a real uvicorn: shapes, media types, bounds, problem+json errors."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from secure.signed_note import NoteSigner, generate_note_key, open_note, parse_checkpoint
from server.audit import merkle
from server.audit.api import create_audit_router
from server.audit.log import MAX_PAGE, AuditLog
from server.audit.storage import SQLiteStorage
from server.problem import install_problem_handlers
from tests.audit_support import record, serve_log

N = 1234


@pytest.fixture(scope="module")
def signer() -> NoteSigner:
    return generate_note_key("fedvault.test/audit")


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory, signer: NoteSigner) -> Iterator[AuditLog]:
    storage = SQLiteStorage(tmp_path_factory.mktemp("api") / "audit.db")
    storage.append([r for r in (_enc(i) for i in range(N))])
    audit = AuditLog(storage, signer)
    yield audit
    audit.close()


def _enc(i: int) -> bytes:
    from server.audit.records import encode_record

    return encode_record(record(i))


@pytest.fixture(scope="module")
def client(log: AuditLog) -> Iterator[httpx.Client]:
    with serve_log(log, token="s3cret") as url:  # noqa: S106
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer s3cret"}) as c:
            yield c


def _b(text: str) -> bytes:
    return base64.b64decode(text)


def test_checkpoint_and_public_key_are_text(client: httpx.Client, signer: NoteSigner) -> None:
    r = client.get("/v2/audit/checkpoint")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    cp = parse_checkpoint(open_note(r.text, signer.verifier))
    assert cp.size == N
    r = client.get("/v2/audit/public-key")
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text.strip() == signer.verifier.line


def test_entries_page_is_bounded(client: httpx.Client) -> None:
    r = client.get("/v2/audit/entries", params={"start": 0, "end": N})
    entries = r.json()["entries"]
    assert len(entries) == MAX_PAGE
    assert entries[5] == {"index": 5, "entry": base64.b64encode(_enc(5)).decode()}
    tail = client.get("/v2/audit/entries", params={"start": N - 2, "end": N + 50}).json()
    assert [e["index"] for e in tail["entries"]] == [N - 2, N - 1]


def test_inclusion_proof_verifies(client: httpx.Client, signer: NoteSigner) -> None:
    cp = parse_checkpoint(open_note(client.get("/v2/audit/checkpoint").text, signer.verifier))
    for index in (0, 777, N - 1):
        body = client.get(
            "/v2/audit/proof/inclusion", params={"index": index, "tree_size": N}
        ).json()
        assert body["index"] == index
        assert body["tree_size"] == N
        proof = [_b(h) for h in body["hashes"]]
        merkle.verify_inclusion(index, N, merkle.leaf_hash(_enc(index)), proof, cp.root)


def test_consistency_proof_verifies(client: httpx.Client, log: AuditLog) -> None:
    body = client.get("/v2/audit/proof/consistency", params={"first": 100, "second": N}).json()
    assert (body["first"], body["second"]) == (100, N)
    proof = [_b(h) for h in body["hashes"]]
    merkle.verify_consistency(100, N, log.root(100), log.root(N), proof)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("proof/inclusion", {"index": N, "tree_size": N}),
        ("proof/inclusion", {"index": 0, "tree_size": N + 1}),
        ("proof/inclusion", {"index": -1, "tree_size": N}),
        ("proof/inclusion", {"index": "x", "tree_size": N}),
        ("proof/inclusion", {"tree_size": N}),
        ("proof/consistency", {"first": 0, "second": N}),
        ("proof/consistency", {"first": 5, "second": 4}),
        ("entries", {"start": N + 1, "end": N + 2}),
        ("entries", {"start": 5, "end": 4}),
    ],
)
def test_bad_parameters_are_400_problems(
    client: httpx.Client, path: str, params: dict[str, object]
) -> None:
    r = client.get(f"/v2/audit/{path}", params=params)  # type: ignore[arg-type]
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == 400
    assert body["detail"]
    assert body["type"].startswith("urn:fedvault")


def test_authentication_is_required(client: httpx.Client) -> None:
    r = httpx.get(str(client.base_url) + "/v2/audit/checkpoint")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"


def test_router_refuses_until_the_gateway_wires_auth(log: AuditLog) -> None:
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(create_audit_router(log))
    with TestClient(app) as c:
        r = c.get("/v2/audit/checkpoint")
    assert r.status_code == 403
    assert "no authentication" in r.json()["detail"]


def test_checkpoint_grows_after_appends(tmp_path: Path, signer: NoteSigner) -> None:
    audit = AuditLog(SQLiteStorage(tmp_path / "g.db"), signer, checkpoint_interval=0.0)
    try:
        with serve_log(audit) as url:
            assert (
                parse_checkpoint(
                    open_note(httpx.get(url + "/v2/audit/checkpoint").text, signer.verifier)
                ).size
                == 0
            )
            audit.append(record(0))
            note = httpx.get(url + "/v2/audit/checkpoint").text
            assert parse_checkpoint(open_note(note, signer.verifier)).size == 1
    finally:
        audit.close()
