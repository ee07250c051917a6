"""Gateway REST: OIP v2 health, metadata, infer (JSON and binary), errors, limits, admin."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.gateway.rest import create_rest_app
from tests.gateway_support import MODEL, OTHER, TAMPERED, Harness, build, expected_logits, features
from tests.he_support import live_server


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("gw"))
    yield h
    h.log.close()


@pytest.fixture(scope="module")
def url(harness: Harness) -> Iterator[str]:
    with live_server(create_rest_app(harness.gw)) as base:
        yield base


def _auth(h: Harness, role: str = "analyst") -> dict[str, str]:
    return {"Authorization": f"Bearer {h.tokens[role]}"}


def _json_infer(x: np.ndarray, **extra: object) -> dict[str, object]:  # type: ignore[type-arg]
    return {
        "inputs": [
            {"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
        ],
        **extra,
    }


def test_health_needs_no_key(url: str) -> None:
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def test_server_and_model_metadata(harness: Harness, url: str) -> None:
    meta = httpx.get(f"{url}/v2", headers=_auth(harness)).json()
    assert meta["name"] == "fedvault"
    assert "binary_tensor_data" in meta["extensions"]
    model = httpx.get(f"{url}/v2/models/{MODEL}", headers=_auth(harness)).json()
    assert model["versions"] == ["1", "2"]
    assert model["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]
    assert [o["name"] for o in model["outputs"]] == ["logits", "probabilities", "class"]
    v1 = httpx.get(f"{url}/v2/models/{MODEL}/versions/1", headers=_auth(harness)).json()
    assert v1["versions"] == ["1"]
    ready = httpx.get(f"{url}/v2/models/{MODEL}/versions/2/ready", headers=_auth(harness))
    assert ready.status_code == 200


def test_json_infer_matches_registry_forward_and_metadata(harness: Harness, url: str) -> None:
    x = features(5)
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=_json_infer(x), headers=_auth(harness))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == MODEL
    assert body["model_version"] == "2"
    meta = httpx.get(f"{url}/v2/models/{MODEL}", headers=_auth(harness)).json()
    declared = {o["name"]: o for o in meta["outputs"]}
    assert [o["name"] for o in body["outputs"]] == list(declared)
    for out in body["outputs"]:
        spec = declared[out["name"]]
        assert out["datatype"] == spec["datatype"]
        assert len(out["shape"]) == len(spec["shape"])
        assert all(s == -1 or s == d for s, d in zip(spec["shape"], out["shape"], strict=True))
    logits = np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(5, 2)
    np.testing.assert_allclose(logits, expected_logits(harness, "2", x), rtol=1e-5, atol=1e-5)
    assert body["outputs"][2]["data"] == logits.argmax(axis=1).tolist()


def test_binary_tensor_extension_both_ways(harness: Harness, url: str) -> None:
    x = features(3)
    raw = x.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [3, 30],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [
                {"name": "logits", "parameters": {"binary_data": True}},
                {"name": "class", "parameters": {"binary_data": False}},
            ],
        }
    ).encode()
    r = httpx.post(
        f"{url}/v2/models/{MODEL}/versions/1/infer",
        content=head + raw,
        headers={
            **_auth(harness),
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    doc = json.loads(r.content[:n])
    assert [o["name"] for o in doc["outputs"]] == ["logits", "class"]
    size = doc["outputs"][0]["parameters"]["binary_data_size"]
    logits = np.frombuffer(r.content[n : n + size], dtype="<f4").reshape(3, 2)
    np.testing.assert_allclose(logits, expected_logits(harness, "1", x), rtol=1e-5, atol=1e-5)
    assert doc["outputs"][1]["data"] == logits.argmax(axis=1).tolist()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["inputs"][0].update(name="pixels"),
        lambda d: d["inputs"][0].update(datatype="FP64"),
        lambda d: d["inputs"][0].update(datatype="BYTES"),
        lambda d: d["inputs"][0].update(shape=[2, 29]),
        lambda d: d["inputs"][0].update(shape=[2, 30, 1]),
        lambda d: d["inputs"][0].update(data=[1.0, 2.0]),
        lambda d: d["inputs"][0].update(data="nope"),
        lambda d: d["inputs"][0].update(shape=[-1, 30]),
        lambda d: d.update(inputs=[]),
        lambda d: d.update(outputs=[{"name": "nope"}]),
        lambda d: d["inputs"].append(dict(d["inputs"][0])),
    ],
)
def test_wrong_inputs_are_400_problems(harness: Harness, url: str, mutate: object) -> None:
    doc = _json_infer(features(2))
    mutate(doc)  # type: ignore[operator]
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=doc, headers=_auth(harness))
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"] == "urn:fedvault:problem:invalid-request"


def test_malformed_bodies_are_400(harness: Harness, url: str) -> None:
    for body, headers in (
        (b"not json", {}),
        (b'{"inputs": [{"name": "features"}]}', {}),
        (b"{}", {"Inference-Header-Content-Length": "999"}),
        (
            b'{"inputs":[{"name":"features","shape":[1,30],"datatype":"FP32",'
            b'"parameters":{"binary_data_size":120}}]}',
            {},
        ),
    ):
        r = httpx.post(
            f"{url}/v2/models/{MODEL}/infer", content=body, headers={**_auth(harness), **headers}
        )
        assert r.status_code == 400, (body, r.text)


def test_unknown_model_and_version_404_tampered_refused(harness: Harness, url: str) -> None:
    doc = _json_infer(features(1))
    r = httpx.post(f"{url}/v2/models/{MODEL}/versions/9/infer", json=doc, headers=_auth(harness))
    assert r.status_code == 404
    admin = _auth(harness, "admin")
    assert httpx.get(f"{url}/v2/models/nope", headers=admin).status_code == 404
    ready = httpx.get(f"{url}/v2/models/{TAMPERED}/ready", headers=admin)
    assert ready.status_code == 503
    index = httpx.post(f"{url}/v2/repository/index", headers=admin).json()
    tampered = [e for e in index if e["name"] == TAMPERED]
    assert tampered == [
        {
            "name": TAMPERED,
            "version": "1",
            "state": "UNAVAILABLE",
            "model_id": harness.ids[TAMPERED],
            "reason": "IntegrityError",
            "default": False,
        }
    ]
    assert b'fedvault_model_load_failures_total{model="bc-tampered",version="1"} 1.0' in (
        harness.gw.metrics.exposition()
    )


def test_rollback_changes_default_version(harness: Harness, url: str) -> None:
    admin = _auth(harness, "admin")
    r = httpx.post(f"{url}/v2/repository/models/{MODEL}/rollback", json={}, headers=admin)
    assert r.json() == {"name": MODEL, "default_version": "1"}
    doc = _json_infer(features(1))
    out = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=doc, headers=_auth(harness)).json()
    assert out["model_version"] == "1"
    r = httpx.post(f"{url}/v2/repository/models/{MODEL}/rollback", json={}, headers=admin)
    assert r.status_code == 409
    r = httpx.post(
        f"{url}/v2/repository/models/{MODEL}/rollback", json={"version": "2"}, headers=admin
    )
    assert r.json()["default_version"] == "2"
    assert harness.gw.store.default_version(MODEL) == "2"


def test_unknown_route_and_method_are_problems(harness: Harness, url: str) -> None:
    r = httpx.get(f"{url}/v3/whatever", headers=_auth(harness))
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    r = httpx.delete(f"{url}/v2/models/{MODEL}/infer", headers=_auth(harness))
    assert r.status_code == 405


def test_body_size_limit_413(tmp_path: Path) -> None:
    from server.gateway.rest import Limits

    h = build(tmp_path, limits=Limits(max_body_bytes=2048))
    try:
        with live_server(create_rest_app(h.gw)) as base:
            doc = _json_infer(features(40))
            r = httpx.post(f"{base}/v2/models/{MODEL}/infer", json=doc, headers=_auth(h))
            assert r.status_code == 413
            assert r.json()["type"] == "urn:fedvault:problem:payload-too-large"
    finally:
        h.log.close()


def test_rate_limit_429_with_retry_after(tmp_path: Path) -> None:
    h = build(tmp_path, rate=0.5, burst=2)
    try:
        with live_server(create_rest_app(h.gw)) as base:
            codes = [httpx.get(f"{base}/v2", headers=_auth(h)) for _ in range(4)]
            assert [r.status_code for r in codes[:2]] == [200, 200]
            limited = codes[-1]
            assert limited.status_code == 429
            assert int(limited.headers["Retry-After"]) >= 1
            # another key has its own bucket
            assert httpx.get(f"{base}/v2", headers=_auth(h, "admin")).status_code == 200
    finally:
        h.log.close()


def test_other_model_grant(harness: Harness, url: str) -> None:
    doc = _json_infer(features(2))
    r = httpx.post(
        f"{url}/v2/models/{OTHER}/infer", json=doc, headers=_auth(harness, "analyst-other")
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["outputs"][0]["data"]) == 4
