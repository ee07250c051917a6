"""``fedvault keys`` and ``fedvault gateway start`` as real processes: plain, mTLS, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest

from secure.tls import create_ca, issue_client_cert, issue_server_cert
from server.audit.log import AuditLog
from server.audit.records import decode_entry
from server.audit.storage import open_storage
from server.gateway.pb import grpc_service_pb2 as pb
from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway_support import MODEL, make_home
from tests.he_support import free_port

FEDVAULT = [sys.executable, "-m", "fedvault"]
INFER = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [1] * 30}]}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDVAULT, *args], capture_output=True, text=True, timeout=60, check=False
    )


@contextmanager
def gateway(
    home: Path, *extra: str, he: bool = False
) -> Iterator[tuple[int, int, subprocess.Popen[str]]]:
    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *FEDVAULT,
            "gateway",
            "start",
            "--home",
            str(home),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            *([] if he else ["--no-he"]),
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}")
            if "gateway_started" in line:
                break
        yield http_port, grpc_port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    make_home(tmp_path)
    return tmp_path


def test_keys_cli_and_gateway_serves_then_stops_cleanly(home: Path) -> None:
    created = _cli(
        "keys", "create", "--role", "analyst", "--model", MODEL, "--home", str(home), "--json"
    )
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    refused = _cli("keys", "create", "--role", "analyst", "--home", str(home))
    assert refused.returncode == 2
    assert "grant" in refused.stderr
    listed = _cli("keys", "list", "--home", str(home))
    assert token not in listed.stdout
    assert json.loads(listed.stdout)[0]["role"] == "analyst"
    with gateway(home) as (http_port, grpc_port, proc):
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.post(
            f"http://127.0.0.1:{http_port}/v2/models/{MODEL}/infer", json=INFER, headers=auth
        )
        assert r.status_code == 200, r.text
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest()).live
            meta = stub.ModelMetadata(
                pb.ModelMetadataRequest(name=MODEL),
                metadata=(("authorization", f"Bearer {token}"),),
            )
            assert meta.name == MODEL
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    key_id = json.loads(created.stdout)["key_id"]
    revoked = _cli("keys", "revoke", key_id, "--home", str(home))
    assert revoked.returncode == 0
    # The audit log was closed cleanly and holds both calls.
    from secure.signed_note import load_note_signer

    log = AuditLog(
        open_storage(str(home / "audit.db")), load_note_signer(home / "keys" / "gateway-audit.key")
    )
    try:
        actions = [decode_entry(e).action for _, e in log.entries(0, log.size())]
    finally:
        log.close()
    assert actions == ["rest:infer", "grpc:ModelMetadata"]


def test_mtls_on_both_front_doors(home: Path, tmp_path: Path) -> None:
    ca = create_ca("gw-test-ca", tmp_path / "ca")
    server = issue_server_cert(ca, tmp_path / "server", hosts=["127.0.0.1", "localhost"])
    client = issue_client_cert(ca, tmp_path / "client", "analytics-app")
    created = _cli(
        "keys", "create", "--role", "analyst", "--model", MODEL, "--home", str(home), "--json"
    )
    token = json.loads(created.stdout)["token"]
    tls = [
        "--tls-cert",
        str(server.cert),
        "--tls-key",
        str(server.key),
        "--client-ca",
        str(ca.ca_cert),
    ]
    with gateway(home, *tls) as (http_port, grpc_port, _):
        url = f"https://127.0.0.1:{http_port}/v2/models/{MODEL}/infer"
        auth = {"Authorization": f"Bearer {token}"}
        import ssl

        ctx = ssl.create_default_context(cafile=str(ca.ca_cert))
        ctx.load_cert_chain(str(client.cert), str(client.key))
        r = httpx.post(url, json=INFER, headers=auth, verify=ctx)
        assert r.status_code == 200, r.text
        no_cert = ssl.create_default_context(cafile=str(ca.ca_cert))
        with pytest.raises(httpx.HTTPError):
            httpx.post(url, json=INFER, headers=auth, verify=no_cert)
        creds = grpc.ssl_channel_credentials(
            ca.ca_cert.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
        )
        with grpc.secure_channel(f"127.0.0.1:{grpc_port}", creds) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            meta = stub.ModelMetadata(
                pb.ModelMetadataRequest(name=MODEL),
                metadata=(("authorization", f"Bearer {token}"),),
            )
            assert meta.name == MODEL
    from secure.signed_note import load_note_signer

    log = AuditLog(
        open_storage(str(home / "audit.db")), load_note_signer(home / "keys" / "gateway-audit.key")
    )
    try:
        records = [decode_entry(e) for _, e in log.entries(0, log.size())]
    finally:
        log.close()
    for action in ("grpc:ModelMetadata", "rest:infer"):
        rec = [r for r in records if r.action == action][-1]
        assert rec.mtls_subject is not None, action
        assert "analytics-app" in rec.mtls_subject, action
