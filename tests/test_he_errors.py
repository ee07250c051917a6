"""Encrypted-inference errors and the stand-alone server's names, listing and probes.

Issue 16, defect 6, on every front door that serves HE: the gateway's REST
routes and its gRPC ``EncryptedInferenceService``, and ``fedvault he serve``'s
app, all over one real registry (``tests.gateway_support``: bc-logreg v1 and
v2, bc-mlp, a tampered bc-tampered), served by uvicorn and grpc.aio.

- a ciphertext (or context) that does not decode is an invalid request (400 /
  ``INVALID_ARGUMENT``, type ``invalid-request``) naming the input, not a
  ``config`` error ("A configuration value is missing…");
- a body that is not JSON says so; JSON of the wrong shape names its fields;
- the stand-alone server resolves a name to its newest version, lists the
  registry as the gateway's repository index does, and answers the health probes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from fedvault.errors import InvalidRequestError, NotFoundError, UnavailableError, problem_type
from secure.client import HEClient, HEKeys, encrypt_batch, params_from_metadata
from secure.he.service import HEService
from server.audit.records import decode_entry
from server.gateway.pb import fedvault_extensions_pb2 as ext
from server.gateway.pb import fedvault_extensions_pb2_grpc as ext_grpc
from server.gateway.rest import create_rest_app
from server.he_api import RegistryCatalog, create_app, registry_model_source
from server.registry import ModelRegistry, load_model_keys
from server.store import FederationStore
from tests.gateway_support import (
    MODEL,
    OTHER,
    TAMPERED,
    Harness,
    build,
    expected_logits,
    features,
    grpc_server,
)
from tests.he_support import live_server, make_registry, register

INVALID = problem_type(InvalidRequestError)
CALLER = {"X-Fedvault-Caller": "clinic-7"}


def _opener(home: Path) -> Any:
    def open_registry() -> tuple[FederationStore, ModelRegistry]:
        store = FederationStore(home / "federation.db")
        keys = load_model_keys(home / "keys", signing=False)
        return store, ModelRegistry(store, home / "registry", keys)

    return open_registry


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("he-errors"))
    yield h
    h.gw.he_service.close()
    h.log.close()


@pytest.fixture(scope="module")
def servers(harness: Harness) -> Iterator[dict[str, tuple[str, dict[str, str]]]]:
    """Base URL and headers of the gateway (API key) and of ``he serve``'s app (caller)."""
    open_registry = _opener(harness.home)
    service = HEService(registry_model_source(open_registry))
    standalone = create_app(service, RegistryCatalog(open_registry, ttl_s=0))
    try:
        with live_server(create_rest_app(harness.gw)) as gw, live_server(standalone) as alone:
            yield {
                "gateway": (gw, {"Authorization": f"Bearer {harness.tokens['analyst']}"}),
                "standalone": (alone, CALLER),
            }
    finally:
        service.close()


def _problem(response: httpx.Response, status: int, type_: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == type_, body
    detail: str = body["detail"]
    return detail


def _context(http: httpx.Client, headers: dict[str, str]) -> tuple[HEKeys, str]:
    meta = http.get(f"/v2/models/{MODEL}/he", headers=headers).raise_for_status().json()
    keys = HEKeys.create(params_from_metadata(meta), galois=False, relin=False)
    cid = (
        http.post(f"/v2/models/{MODEL}/he/contexts", headers=headers, content=keys.public_bytes())
        .raise_for_status()
        .json()["context_id"]
    )
    return keys, str(cid)


@pytest.mark.parametrize("server", ["gateway", "standalone"])
def test_a_malformed_ciphertext_is_an_invalid_request_naming_the_input(
    servers: dict[str, tuple[str, dict[str, str]]], server: str
) -> None:
    url, headers = servers[server]
    with httpx.Client(base_url=url, timeout=120) as http:
        keys, cid = _context(http, headers)
        inputs = [base64.b64encode(c).decode() for c in encrypt_batch(keys, features(3))]
        inputs[2] = base64.b64encode(b"\x00garbage, not a ciphertext").decode()
        body = {"context_id": cid, "layout": "batch", "inputs": inputs}
        detail = _problem(
            http.post(f"/v2/models/{MODEL}/he/infer", headers=headers, json=body), 400, INVALID
        )
        assert detail.startswith("input 2 is not decodable as a CKKS vector"), detail
        assert "registered context" in detail
        body["inputs"] = ["not base64!", *inputs[1:]]
        detail = _problem(
            http.post(f"/v2/models/{MODEL}/he/infer", headers=headers, json=body), 400, INVALID
        )
        assert detail == "input 0 is not valid base64"
        detail = _problem(
            http.post(f"/v2/models/{MODEL}/he/contexts", headers=headers, content=b"\x01" * 64),
            400,
            INVALID,
        )
        assert "not a serialised TenSEAL context" in detail


def test_a_malformed_ciphertext_over_grpc_is_invalid_argument(harness: Harness) -> None:
    md = (("authorization", f"Bearer {harness.tokens['analyst']}"),)
    with grpc_server(harness) as address, grpc.insecure_channel(address) as channel:
        he = ext_grpc.EncryptedInferenceServiceStub(channel)
        meta = he.ModelHEMetadata(ext.ModelHEMetadataRequest(model_id=MODEL), metadata=md)
        keys = HEKeys.create(
            params_from_metadata({"parameters": _parameters(meta)}), galois=False, relin=False
        )
        reg = he.RegisterContext(
            ext.RegisterContextRequest(model_id=MODEL, context=keys.public_bytes()), metadata=md
        )
        inputs = encrypt_batch(keys, features(2))
        inputs[0] = b"\x00garbage" + inputs[0][8:64]
        request = ext.EncryptedInferRequest(
            model_id=MODEL, context_id=reg.context_id, layout="batch", inputs=inputs
        )
        with pytest.raises(grpc.RpcError) as info:
            he.EncryptedInfer(request, metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("input 0 is not decodable as a CKKS vector")
    size = harness.log.size()
    ((_, entry),) = harness.log.entries(size - 1, size)
    assert decode_entry(entry).error_type == INVALID  # what the audit log records


def _parameters(meta: ext.ModelHEMetadataResponse) -> dict[str, Any]:
    parameters: dict[str, Any] = json.loads(meta.metadata_json)["parameters"]
    return parameters


@pytest.mark.parametrize("server", ["gateway", "standalone"])
def test_an_infer_body_that_is_not_json_says_so_and_a_wrong_shape_names_its_fields(
    servers: dict[str, tuple[str, dict[str, str]]], server: str
) -> None:
    url, headers = servers[server]
    infer = f"/v2/models/{MODEL}/he/infer"
    with httpx.Client(base_url=url, timeout=60) as http:
        for raw in (b"{", b"not json", b"\xff\xfe", b""):
            detail = _problem(http.post(infer, headers=headers, content=raw), 400, INVALID)
            assert detail.startswith("infer request body is not JSON"), (raw, detail)
            assert "context_id" in detail  # the expected shape
        detail = _problem(http.post(infer, headers=headers, json=[1, 2]), 400, INVALID)
        assert "not an infer request: body: Input should be an object" in detail
        wrong = {"inputs": "AAAA", "contexts": "x"}
        detail = _problem(http.post(infer, headers=headers, json=wrong), 400, INVALID)
        for field in (
            "context_id: Field required",
            "layout: Field required",
            "inputs:",
            "contexts:",
        ):
            assert field in detail, detail
        many = {"context_id": "c", "layout": "batch", "inputs": list(range(50))}
        detail = _problem(http.post(infer, headers=headers, json=many), 400, INVALID)
        assert "inputs.0: Input should be a valid string" in detail
        assert "(and 45 more)" in detail


def test_standalone_resolves_a_name_to_its_newest_version(
    harness: Harness, servers: dict[str, tuple[str, dict[str, str]]]
) -> None:
    url, headers = servers["standalone"]
    newest, oldest = harness.ids[f"{MODEL}:2"], harness.ids[f"{MODEL}:1"]
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get(f"/v2/models/{MODEL}/he", headers=headers).json()["model_id"] == newest
        assert http.get(f"/v2/models/{oldest}/he", headers=headers).json()["model_id"] == oldest
        detail = _problem(
            http.get("/v2/models/no-such-model/he", headers=headers),
            404,
            problem_type(NotFoundError),
        )
        assert "no-such-model" in detail
    x = features(2).astype(np.float64)
    with HEClient(url, caller="clinic-7") as client:
        result = client.predict(MODEL, x, layout="batch")
    assert np.abs(result.logits - expected_logits(harness, "2", x.astype(np.float32))).max() < 1e-2


def test_standalone_lists_the_registry_as_the_gateway_index_does(
    harness: Harness, servers: dict[str, tuple[str, dict[str, str]]]
) -> None:
    url, headers = servers["standalone"]
    with httpx.Client(base_url=url, timeout=120) as http:
        _problem(http.post("/v2/repository/index"), 401, "urn:fedvault:problem:authentication")
        index = http.post("/v2/repository/index", headers=headers).raise_for_status().json()
    by_id = {entry["model_id"]: entry for entry in index}
    assert set(by_id) == set(harness.ids.values())
    assert by_id[harness.ids[f"{MODEL}:1"]] == {
        "name": MODEL,
        "version": "1",
        "state": "READY",
        "model_id": harness.ids[f"{MODEL}:1"],
        "default": False,
    }
    assert by_id[harness.ids[f"{MODEL}:2"]]["default"] is True
    assert by_id[harness.ids[OTHER]]["state"] == "READY"
    tampered = by_id[harness.ids[TAMPERED]]
    assert (tampered["state"], tampered["reason"]) == ("UNAVAILABLE", "IntegrityError")
    # The same keys as the gateway's own index (for the versions both list).
    gateway = {e["model_id"]: e for e in harness.gw.service.repository.index()}
    for model_id, entry in by_id.items():
        assert set(entry) == set(gateway[model_id]), model_id


def test_standalone_health_probes(servers: dict[str, tuple[str, dict[str, str]]]) -> None:
    url, _ = servers["standalone"]
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200  # no caller needed


def test_standalone_is_not_ready_without_a_model(tmp_path: Path) -> None:
    store, _ = make_registry(tmp_path)
    store.close()
    open_registry = _opener(tmp_path)
    service = HEService(registry_model_source(open_registry))
    with TestClient(create_app(service, RegistryCatalog(open_registry))) as client:
        assert client.get("/v2/health/live").status_code == 200
        response = client.get("/v2/health/ready")
    assert response.status_code == 503
    assert response.json()["type"] == problem_type(UnavailableError)
    assert "holds no model" in response.json()["detail"]


def test_catalog_serves_a_new_version_by_name_after_its_ttl(tmp_path: Path) -> None:
    store, registry = make_registry(tmp_path)
    first = register(registry, "bc", "breast-cancer", "logreg")
    now = [0.0]
    catalog = RegistryCatalog(_opener(tmp_path), ttl_s=5.0, clock=lambda: now[0])
    assert catalog.resolve("bc") == first
    second = register(registry, "bc", "breast-cancer", "logreg")
    store.close()
    assert catalog.resolve("bc") == first  # the cached index, at most ttl_s old
    now[0] += 5.0
    assert catalog.resolve("bc") == second
    assert catalog.resolve(first) == first  # an id still names its own version
    with pytest.raises(NotFoundError, match="'nope'"):
        catalog.resolve("nope")


def test_gateway_he_by_name_follows_the_default_version(
    harness: Harness, servers: dict[str, tuple[str, dict[str, str]]]
) -> None:
    """A name is resolved on every call, REST and gRPC: after a rollback HE serves
    the version plaintext inference serves, not the one it saw first."""
    url, headers = servers["gateway"]
    repository = harness.gw.service.repository
    before = repository.resolve(MODEL, None)
    older = next(v for v in ("1", "2") if v != before.version)
    md = (("authorization", headers["Authorization"]),)

    def ids() -> tuple[str, str]:
        rest = httpx.get(f"{url}/v2/models/{MODEL}/he", headers=headers).raise_for_status()
        with grpc_server(harness) as address, grpc.insecure_channel(address) as channel:
            he = ext_grpc.EncryptedInferenceServiceStub(channel)
            meta = he.ModelHEMetadata(ext.ModelHEMetadataRequest(model_id=MODEL), metadata=md)
        return str(rest.json()["model_id"]), meta.model_id

    assert ids() == (before.model_id, before.model_id)
    repository.rollback(MODEL, older, actor="test")
    try:
        rolled = repository.resolve(MODEL, None).model_id
        assert rolled != before.model_id
        assert ids() == (rolled, rolled)
    finally:
        repository.rollback(MODEL, before.version, actor="test")
