"""Stock tritonclient (HTTP with binary data by default, and gRPC) against the live gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.gateway.rest import create_rest_app
from tests.gateway_support import MODEL, Harness, build, expected_logits, features, grpc_server
from tests.he_support import live_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("gw-triton"))
    yield h
    h.log.close()


def test_tritonclient_http_and_grpc(harness: Harness) -> None:
    x = features(4)
    with live_server(create_rest_app(harness.gw)) as http_url, grpc_server(harness) as grpc_url:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.gateway_clients.triton",
                http_url.removeprefix("http://"),
                grpc_url,
                harness.tokens["analyst"],
                MODEL,
            ],
            input=json.dumps(x.tolist()),
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    want = expected_logits(harness, "2", x)
    assert out["http_live"]
    assert out["grpc_live"]
    assert out["http_meta"]["inputs"] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 30]}
    ]
    assert out["http_server"]["name"] == "fedvault"
    assert out["grpc_meta"]["inputs"][0]["name"] == "features"
    assert out["grpc_meta"]["inputs"][0]["shape"] == ["-1", "30"]
    np.testing.assert_allclose(out["http_logits"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["grpc_logits"], want, rtol=1e-5, atol=1e-5)
    assert out["http_class"] == out["grpc_class"] == want.argmax(axis=1).tolist()
    assert out["http_version"] == "2"
    assert np.asarray(out["http_probs_v1"]).shape == (4, 2)
    assert out["http_bad"] == "400"
    assert out["grpc_bad"] == "StatusCode.INVALID_ARGUMENT"
    assert out["http_nokey"] == "401"
    assert out["grpc_nokey"] == "StatusCode.UNAUTHENTICATED"


def test_tritonclient_shows_the_servers_error_messages(harness: Harness) -> None:
    """Issue 16 #1: problem+json bodies carry OIP's ``error`` member, so tritonclient
    shows the gateway's message instead of "...while decoding the response: 'error'"."""
    # Granted every model, so an unknown one is a 404 (not this key's 403).
    token, _ = harness.gw.store.create_key("analyst", models=frozenset({"*"}))
    with live_server(create_rest_app(harness.gw)) as http_url:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.gateway_clients.triton_errors",
                http_url.removeprefix("http://"),
                token,
                MODEL,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert {case: seen["status"] for case, seen in out.items()} == {
        "unknown_model_metadata": "404",
        "unknown_model_infer": "404",
        "unknown_version": "404",
        "bad_input_name": "400",
        "no_key": "401",
    }
    messages = {case: seen["message"] for case, seen in out.items()}
    assert messages["unknown_model_metadata"] == "no model named 'no-such-model'"
    assert messages["unknown_model_infer"] == "no model named 'no-such-model'"
    assert messages["unknown_version"] == f"model {MODEL!r} has no version '9'"
    assert "unknown 'pixels'" in messages["bad_input_name"]
    assert "missing 'mean_radius'" in messages["bad_input_name"]
    assert messages["no_key"] == "missing Authorization: Bearer <API key>"
    assert not any("decoding the response" in m for m in messages.values())
