"""The authorisation matrix: every REST endpoint × every role × no/invalid/revoked/expired key.

Expected codes are written out per endpoint so that a change of policy shows
up as a diff of this table. "Allowed" means the handler ran: its own answer
(200, or 400/404 for the deliberately empty HE bodies) — never 401/403.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.gateway.rest import create_rest_app
from tests.gateway_support import MODEL, OTHER, Harness, build
from tests.he_support import live_server

ROLES = ("admin", "analyst", "partner", "auditor")
D = 403  # denied


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    codes: dict[str, int]  # role -> expected status
    json: Any = None


def _all(code: int) -> dict[str, int]:
    return dict.fromkeys(ROLES, code)


M = f"/v2/models/{MODEL}"
INFER = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0] * 30}]}
ENDPOINTS = [
    Endpoint("GET", "/v2", _all(200)),
    Endpoint("GET", M, {"admin": 200, "analyst": 200, "partner": 200, "auditor": D}),
    Endpoint(
        "GET", f"{M}/versions/1", {"admin": 200, "analyst": 200, "partner": 200, "auditor": D}
    ),
    Endpoint("GET", f"{M}/ready", {"admin": 200, "analyst": 200, "partner": 200, "auditor": D}),
    Endpoint(
        "GET", f"{M}/versions/1/ready", {"admin": 200, "analyst": 200, "partner": 200, "auditor": D}
    ),
    Endpoint("POST", f"{M}/infer", {"admin": D, "analyst": 200, "partner": D, "auditor": D}, INFER),
    Endpoint(
        "POST",
        f"{M}/versions/1/infer",
        {"admin": D, "analyst": 200, "partner": D, "auditor": D},
        INFER,
    ),
    Endpoint("POST", "/v2/repository/index", {**_all(D), "admin": 200}),
    Endpoint("POST", "/v2/repository/reload", {**_all(D), "admin": 200}),
    Endpoint(
        "POST",
        f"/v2/repository/models/{MODEL}/rollback",
        {**_all(D), "admin": 200},
        {"version": "2"},
    ),
    Endpoint("GET", "/v2/admin/keys", {**_all(D), "admin": 200}),
    Endpoint("POST", "/v2/admin/keys", {**_all(D), "admin": 201}, {"role": "auditor"}),
    Endpoint("DELETE", "/v2/admin/keys/000000000000", {**_all(D), "admin": 404}),
    Endpoint("GET", "/v2/partner/runs", {**_all(D), "partner": 200}),
    Endpoint("GET", "/v2/partner/runs/run-gw/ledger", {**_all(D), "partner": 200}),
    Endpoint("GET", "/metrics", {**_all(D), "auditor": 200}),
    Endpoint("GET", "/v2/audit/checkpoint", {**_all(D), "auditor": 200}),
    Endpoint("GET", "/v2/audit/public-key", {**_all(D), "auditor": 200}),
    Endpoint("GET", "/v2/audit/entries?start=0&end=2", {**_all(D), "auditor": 200}),
    Endpoint("GET", "/v2/audit/proof/inclusion?index=0&tree_size=1", {**_all(D), "auditor": 200}),
    Endpoint("GET", "/v2/audit/proof/consistency?first=1&second=1", {**_all(D), "auditor": 200}),
    Endpoint("GET", f"{M}/he", {**_all(D), "analyst": 200}),
    Endpoint("POST", f"{M}/he/contexts", {**_all(D), "analyst": 400}),
    Endpoint("POST", f"{M}/he/infer", {**_all(D), "analyst": 400}, {"nope": 1}),
    Endpoint("DELETE", "/v2/he/contexts/unknown", {**_all(D), "analyst": 404}),
]
OPEN = [
    Endpoint("GET", "/v2/health/live", _all(200)),
    Endpoint("GET", "/v2/health/ready", _all(200)),
]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("gw-auth"))
    yield h
    h.log.close()


@pytest.fixture(scope="module")
def client(harness: Harness) -> Iterator[httpx.Client]:
    with live_server(create_rest_app(harness.gw)) as base, httpx.Client(base_url=base) as c:
        yield c


def _call(client: httpx.Client, ep: Endpoint, headers: dict[str, str]) -> httpx.Response:
    return client.request(ep.method, ep.path, json=ep.json, headers=headers)


def _template(path: str) -> str:
    path = path.split("?")[0]
    model = "{model_id}" if path.endswith(("/he", "/he/contexts", "/he/infer")) else "{model_name}"
    return (
        path.replace(MODEL, model)
        .replace("/versions/1", "/versions/{model_version}")
        .replace("run-gw", "{run_id}")
        .replace("000000000000", "{key_id}")
        .replace("/contexts/unknown", "/contexts/{context_id}")
    )


def test_matrix_covers_every_route(harness: Harness) -> None:
    """Every route in the OpenAPI document (ours, HE, audit) is in the matrix, and back."""
    paths = create_rest_app(harness.gw).openapi()["paths"]
    routes = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    covered = {(ep.method, _template(ep.path)) for ep in [*ENDPOINTS, *OPEN]}
    assert routes == covered


@pytest.mark.parametrize("ep", ENDPOINTS, ids=lambda e: f"{e.method} {e.path}")
def test_roles(harness: Harness, client: httpx.Client, ep: Endpoint) -> None:
    for role in ROLES:
        r = _call(client, ep, {"Authorization": f"Bearer {harness.tokens[role]}"})
        assert r.status_code == ep.codes[role], (role, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert r.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize("ep", ENDPOINTS, ids=lambda e: f"{e.method} {e.path}")
def test_no_or_bad_key_is_401(harness: Harness, client: httpx.Client, ep: Endpoint) -> None:
    bad = [
        {},
        {"Authorization": "Bearer fvk_000000000000_" + "x" * 43},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": f"Bearer {harness.tokens['revoked']}"},
        {"Authorization": f"Bearer {harness.tokens['expired']}"},
        {"Authorization": f"Bearer {harness.tokens['analyst'][:-2]}xx"},
    ]
    for headers in bad:
        r = _call(client, ep, headers)
        assert r.status_code == 401, (headers, r.status_code, r.text[:200])
        assert r.json()["type"] == "urn:fedvault:problem:authentication"
        assert harness.tokens["analyst"] not in r.text


@pytest.mark.parametrize("ep", OPEN, ids=lambda e: e.path)
def test_health_is_open(client: httpx.Client, ep: Endpoint) -> None:
    assert _call(client, ep, {}).status_code == 200


def test_model_grants_and_partner_scope(harness: Harness, client: httpx.Client) -> None:
    other = {"Authorization": f"Bearer {harness.tokens['analyst-other']}"}
    assert client.post(f"{M}/infer", json=INFER, headers=other).status_code == 403
    assert client.get(f"/v2/models/{OTHER}", headers=other).status_code == 200
    gamma = {"Authorization": f"Bearer {harness.tokens['partner-gamma']}"}
    assert client.get(M, headers=gamma).status_code == 403
    assert client.get("/v2/partner/runs", headers=gamma).json() == []
    assert client.get("/v2/partner/runs/run-gw/ledger", headers=gamma).status_code == 404
    alpha = {"Authorization": f"Bearer {harness.tokens['partner']}"}
    rows = client.get("/v2/partner/runs/run-gw/ledger", headers=alpha).json()
    assert {r["partner"] for r in rows} == {"alpha"}


def test_admin_key_lifecycle_over_rest(harness: Harness, client: httpx.Client) -> None:
    admin = {"Authorization": f"Bearer {harness.tokens['admin']}"}
    created = client.post(
        "/v2/admin/keys", json={"role": "analyst", "models": [MODEL]}, headers=admin
    ).json()
    token = created["token"]
    assert token.startswith("fvk_")
    listed = client.get("/v2/admin/keys", headers=admin).json()
    assert all("token" not in k and "hash" not in k for k in listed)
    me = {"Authorization": f"Bearer {token}"}
    assert client.post(f"{M}/infer", json=INFER, headers=me).status_code == 200
    assert client.delete(f"/v2/admin/keys/{created['key_id']}", headers=admin).json()["revoked"]
    assert client.post(f"{M}/infer", json=INFER, headers=me).status_code == 401


def _revoke_in_another_process(db: Path, key_id: str) -> None:
    code = (
        "import sys; from pathlib import Path; from server.gateway.keys import GatewayStore; "
        "s = GatewayStore(Path(sys.argv[1])); s.revoke(sys.argv[2]); s.close()"
    )
    subprocess.run([sys.executable, "-c", code, str(db), key_id], check=True, timeout=60)


def test_revocation_elsewhere_is_honoured_by_the_next_request(
    harness: Harness, client: httpx.Client
) -> None:
    """No 30 s window: the cached verdict is re-checked against the revocation counter."""
    import grpc

    from server.gateway.keys import GatewayStore
    from server.gateway.pb import grpc_service_pb2 as pb
    from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc
    from tests.gateway_support import grpc_server

    store = harness.gw.store
    by_process, key1 = store.create_key("analyst", models=frozenset({MODEL}))
    by_connection, key2 = store.create_key("analyst", models=frozenset({MODEL}))
    with grpc_server(harness) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for token in (by_process, by_connection):  # verified once: now cached
            assert client.get(M, headers={"Authorization": f"Bearer {token}"}).status_code == 200
            stub.ServerMetadata(
                pb.ServerMetadataRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )
        _revoke_in_another_process(store.path, key1.key_id)
        other = GatewayStore(store.path)  # a second connection, as `fedvault keys revoke`
        other.revoke(key2.key_id)
        other.close()
        for token in (by_process, by_connection):
            r = client.get(M, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401
            assert r.json()["detail"] == "API key revoked"
            with pytest.raises(grpc.RpcError) as info:
                stub.ServerMetadata(
                    pb.ServerMetadataRequest(), metadata=(("authorization", f"Bearer {token}"),)
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Keys that were not revoked keep their cached verdicts.
    analyst = {"Authorization": f"Bearer {harness.tokens['analyst']}"}
    assert client.get(M, headers=analyst).status_code == 200


# ------------------------------------------------------------ gRPC (OIP service)
OK, DENIED = "OK", "PERMISSION_DENIED"
GRPC_OPEN = ("ServerLive", "ServerReady")
GRPC_MATRIX: dict[str, dict[str, str]] = {  # method -> role -> status ("OK": the handler ran)
    "ServerMetadata": dict.fromkeys(ROLES, OK),
    "ModelReady": {"admin": OK, "analyst": OK, "partner": OK, "auditor": DENIED},
    "ModelMetadata": {"admin": OK, "analyst": OK, "partner": OK, "auditor": DENIED},
    "ModelInfer": {"admin": DENIED, "analyst": OK, "partner": DENIED, "auditor": DENIED},
    # Per message: the stream opens for every live key, each message is authorised.
    "ModelStreamInfer": {"admin": DENIED, "analyst": OK, "partner": DENIED, "auditor": DENIED},
}


def _grpc_status(stub: Any, method: str, metadata: tuple[tuple[str, str], ...]) -> str:
    """The status name one call of ``method`` ends with (for the stream: its one message)."""
    import grpc

    from server.gateway.pb import grpc_service_pb2 as pb

    infer = pb.ModelInferRequest(model_name=MODEL)
    infer.inputs.add(name="features", datatype="FP32", shape=[1, 30])
    infer.inputs[0].contents.fp32_contents.extend([0.0] * 30)
    requests = {
        "ServerLive": pb.ServerLiveRequest(),
        "ServerReady": pb.ServerReadyRequest(),
        "ServerMetadata": pb.ServerMetadataRequest(),
        "ModelReady": pb.ModelReadyRequest(name=MODEL),
        "ModelMetadata": pb.ModelMetadataRequest(name=MODEL),
        "ModelInfer": infer,
    }
    try:
        if method == "ModelStreamInfer":
            (answer,) = list(stub.ModelStreamInfer(iter([infer]), metadata=metadata))
            return answer.error_message.split(":")[0] or OK
        getattr(stub, method)(requests[method], metadata=metadata)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return OK


def test_grpc_matrix(harness: Harness) -> None:
    """Every RPC of inference.GRPCInferenceService × every role, and bad keys: UNAUTHENTICATED."""
    import grpc

    from server.gateway.pb import grpc_service_pb2 as pb
    from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc
    from tests.gateway_support import grpc_server

    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert methods == set(GRPC_MATRIX) | set(GRPC_OPEN)
    bad_keys = [
        (),
        (("authorization", "Bearer fvk_000000000000_" + "x" * 43),),
        (("authorization", f"Bearer {harness.tokens['revoked']}"),),
        (("authorization", f"Bearer {harness.tokens['expired']}"),),
    ]
    with grpc_server(harness) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for method in GRPC_OPEN:
            assert _grpc_status(stub, method, ()) == OK
        for method, codes in GRPC_MATRIX.items():
            for role in ROLES:
                md = (("authorization", f"Bearer {harness.tokens[role]}"),)
                assert _grpc_status(stub, method, md) == codes[role], (method, role)
            for md in bad_keys:
                assert _grpc_status(stub, method, md) == "UNAUTHENTICATED", (method, md)
