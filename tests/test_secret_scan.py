"""The session's secrets check can fail: each kind of leak it looks for is found.

The leaks are planted in a directory outside the session's base temporary
directory, so that the real end-of-session scan does not see them.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from tests import secret_scan

TOKEN = f"fvk_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


@pytest.fixture
def outside() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="fedvault-scan-"))
    try:
        yield where
    finally:
        shutil.rmtree(where)


@pytest.fixture
def collecting(outside: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Error answers go to ``outside`` for this test (the session's sink is restored)."""
    sink = outside / secret_scan.ERROR_ANSWERS
    if secret_scan._sink is None:  # FEDVAULT_SECRET_SCAN=0: the observers are not in place
        monkeypatch.setattr(secret_scan, "_sink", None)
        secret_scan.install(monkeypatch, outside)
    else:
        monkeypatch.setattr(secret_scan, "_sink", sink)
        sink.touch()
    return sink


def _answers(sink: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in sink.read_text().splitlines()]


def test_a_token_in_a_log_is_found(outside: Path) -> None:
    (outside / "gateway.log").write_text(f"refused key {TOKEN}\n")
    (outside / "clean.log").write_text("refused key fvk_0123456789ab (id only)\n")
    assert secret_scan.scan(outside) == [f"{outside / 'gateway.log'}: an API token"]


def test_a_private_key_files_content_in_a_log_is_found(outside: Path) -> None:
    body = secrets.token_urlsafe(48)
    (outside / "keys").mkdir()
    (outside / "keys" / "model.key").write_text(f"{body}\n")
    (outside / "export.json").write_text(json.dumps({"note": f"key={body}"}))
    assert secret_scan.scan(outside) == [
        f"{outside / 'export.json'}: the content of a private-key file"
    ]


def test_a_pem_block_in_a_log_is_found(outside: Path) -> None:
    (outside / "node.out").write_text("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n")
    assert secret_scan.scan(outside) == [f"{outside / 'node.out'}: a private key"]


class _Leaky(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"error": f"bad key {TOKEN}"}).encode()
        self.send_response(403 if self.path == "/leak" else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def test_http_error_bodies_are_collected_and_found(collecting: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Leaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert httpx.get(f"{url}/fine").status_code == 200  # a 2xx is not an error answer
        assert httpx.get(f"{url}/leak").status_code == 403
    finally:
        server.shutdown()
        server.server_close()
    assert [(a["kind"], a["status"]) for a in _answers(collecting)] == [("http", "403")]
    assert secret_scan.scan(collecting.parent) == [f"{collecting}: an API token"]


def test_grpc_error_details_are_collected(collecting: Path) -> None:
    def deny(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"bad key {TOKEN}")

    handler = grpc.method_handlers_generic_handler(
        "t.T", {"Call": grpc.unary_unary_rpc_method_handler(deny)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/t.T/Call")(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop(None)
    assert [(a["kind"], a["status"]) for a in _answers(collecting)] == [
        ("grpc", "PERMISSION_DENIED")
    ]
    assert secret_scan.scan(collecting.parent) == [f"{collecting}: an API token"]


def test_failed_cli_runs_are_collected(collecting: Path) -> None:
    secret_scan.record_cli_failure(0, "fine")
    secret_scan.record_cli_failure(2, "Error: no such model")
    assert _answers(collecting) == [{"kind": "cli", "status": "2", "text": "Error: no such model"}]
