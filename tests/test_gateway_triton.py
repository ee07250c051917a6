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
