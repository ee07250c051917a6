"""Slow and idle clients cannot hold connections: header and idle timeouts, a connection cap.

Issue 16, defect 10: a connection that sent nothing, or half its headers,
stayed open indefinitely and nothing capped their number, so slow clients
could use up the server's file descriptors. Every fedvault HTTP server goes
through :mod:`server.http_serving` (gateway REST door, ``he serve``,
``audit serve``); the gateway's gRPC door gets grpc core's equivalents
(handshake deadline, connection cap, idle close).
Small timeouts keep each test to a few seconds.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from secure import create_ca, issue_server_cert
from secure.signed_note import generate_note_key, save_note_signer
from server.gateway.pb import grpc_service_pb2 as pb
from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc
from server.http_serving import ConnectionLimits
from tests.http_support import connect, guarded_server, read_until_closed

FAST = ConnectionLimits(
    header_timeout_s=0.5, idle_timeout_s=0.3, max_connections=64, send_timeout_s=0.5
)
BIG = 16 << 20  # far more than the kernel's socket buffers hold
SLACK_S = 1.5  # scheduling on a loaded machine; the defect held connections for minutes


async def echo_app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
    """Reads the whole body, answers its length; ``/block`` blocks the loop for 1 s;
    ``/big`` answers :data:`BIG` bytes.

    It blocks in a timer callback: uvloop (libuv) runs due timers before it
    polls for I/O, so a guard's overdue timer fires next, before the bytes
    that arrived meanwhile are read (blocking in a task, it would not).
    """
    assert scope["type"] == "http"
    if scope["path"] == "/block":
        asyncio.get_running_loop().call_later(0.01, time.sleep, 1.0)
    size = 0
    while True:
        message = await receive()  # type: ignore[operator]
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"x" * BIG if scope["path"] == "/big" else str(size).encode()
    await send(  # type: ignore[operator]
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})  # type: ignore[operator]


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with guarded_server(echo_app, FAST) as bound:
        yield bound


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(port: int) -> None:
    with connect(port) as sock:
        data, took = read_until_closed(sock, FAST.header_timeout_s + SLACK_S)
    assert data == b""  # nothing asked, nothing answered
    assert took >= FAST.header_timeout_s - 0.1


def test_half_headers_get_408_then_close(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: ")
        data, took = read_until_closed(sock, FAST.header_timeout_s + SLACK_S)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert took >= FAST.header_timeout_s - 0.1


def test_trickled_headers_do_not_extend_the_deadline(port: int) -> None:
    """One byte every 0.1 s (well inside the idle timeout): the header deadline is a total."""
    start = time.monotonic()
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
        while time.monotonic() - start < FAST.header_timeout_s + SLACK_S:
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                break
            sock.sendall(b"a")
        data, _ = read_until_closed(sock, SLACK_S)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert time.monotonic() - start < FAST.header_timeout_s + SLACK_S


def test_a_stalled_body_gets_408_at_the_idle_timeout(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        data, took = read_until_closed(sock, FAST.idle_timeout_s + SLACK_S)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert took >= FAST.idle_timeout_s - 0.1


def test_a_busy_loop_is_not_taken_for_a_silent_client(port: int) -> None:
    """Bytes sent in time but unread while the loop was blocked do not count as a stall."""
    with connect(port) as slow, connect(port) as blocker:
        slow.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        time.sleep(0.05)  # the server has read it and armed the idle timer
        blocker.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)  # the loop is blocked now (for 1 s, beyond the 0.3 s idle timeout)
        slow.sendall(b"56789")
        slow.settimeout(5)
        data = slow.recv(4096)
    assert data.startswith(b"HTTP/1.1 200 "), data
    assert data.endswith(b"\r\n\r\n10")


def test_keep_alive_closes_at_the_idle_timeout_and_requests_work(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        data, took = read_until_closed(sock, FAST.idle_timeout_s + SLACK_S)
    assert data.startswith(b"HTTP/1.1 200 "), data
    assert data.endswith(b"\r\n\r\n3")
    assert took >= FAST.idle_timeout_s - 0.1


def test_a_client_that_stops_reading_is_cut_at_the_send_timeout(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n")
        time.sleep(FAST.send_timeout_s + SLACK_S)  # never reads: the server's buffer fills
        data, _ = read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert len(data) < BIG  # aborted mid-answer, not waited for


def test_a_slow_reader_that_keeps_reading_gets_the_whole_answer(port: int) -> None:
    """Reading 64 KiB every 0.1 s for 4 s (eight send timeouts, far from a full
    drain): each timeout sees the buffer shrink, so the connection is not cut."""
    with connect(port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.sendall(b"GET /big HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        chunks = []
        sock.settimeout(10)
        while chunk := sock.recv(64 << 10):
            chunks.append(chunk)
            if len(chunks) < 40:
                time.sleep(0.1)  # slower than the server for a few seconds, then at full speed
    data = b"".join(chunks)
    assert data.endswith(b"x" * 1000)
    assert len(data.partition(b"\r\n\r\n")[2]) == BIG


def test_beyond_the_cap_connections_get_503_and_requests_succeed_afterwards() -> None:
    limits = ConnectionLimits(header_timeout_s=30, idle_timeout_s=30, max_connections=3)
    with guarded_server(echo_app, limits) as port:
        url = f"http://127.0.0.1:{port}/"
        held = [connect(port) for _ in range(2)]
        try:
            with httpx.Client() as client:  # the third connection, within the cap
                assert client.post(url, content=b"x" * 10).text == "10"
                held.append(connect(port))
                with connect(port) as extra:
                    data, _ = read_until_closed(extra, SLACK_S)
                assert data.startswith(b"HTTP/1.1 503 "), data
                assert b"retry-after: 1" in data.lower()
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while True:  # the server sees the close promptly; then there is room again
            try:
                got = httpx.post(url, content=b"abc", timeout=2)
            except httpx.TransportError:
                got = None
            if got is not None and got.status_code == 200:
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        assert got.text == "3"


def test_a_tls_client_that_never_handshakes_is_closed_at_the_header_timeout(
    tmp_path: Path,
) -> None:
    """A TLS connection reaches the guarded protocol only after its handshake;
    the handshake itself is bounded by the header timeout (asyncio's default: 60 s)."""
    ca = create_ca("fedvault-test-ca", tmp_path / "pki")
    leaf = issue_server_cert(ca, tmp_path / "pki", hosts=["127.0.0.1"])
    tls = {"ssl_certfile": str(leaf.cert), "ssl_keyfile": str(leaf.key)}
    with guarded_server(echo_app, FAST, **tls) as port:
        with connect(port) as silent:
            data, took = read_until_closed(silent, FAST.header_timeout_s + SLACK_S)
        assert data == b""
        assert took >= FAST.header_timeout_s - 0.1
        trusted = ssl.create_default_context(cafile=str(ca.ca_cert))
        with connect(port) as raw, trusted.wrap_socket(raw, server_hostname="127.0.0.1") as quiet:
            # Handshake done, then nothing: the protocol's own header timer.
            data, took = read_until_closed(quiet, FAST.header_timeout_s + SLACK_S)
        assert data == b""
        answer = httpx.post(f"https://127.0.0.1:{port}/", content=b"abcd", verify=trusted)
        assert answer.text == "4"


def test_limits_are_validated() -> None:
    from fedvault.errors import ConfigError

    with pytest.raises(ConfigError, match="header_timeout_s"):
        ConnectionLimits(header_timeout_s=0)
    with pytest.raises(ConfigError, match="max_connections"):
        ConnectionLimits(max_connections=0)


# ---------------------------------------------------------- the servers' command lines
def test_every_http_command_offers_the_connection_options() -> None:
    import typer

    from fedvault.cli.main import app

    root = typer.main.get_command(app)
    commands = (
        ("gateway", "start"),
        ("he", "serve"),
        ("audit", "serve"),
        ("federation", "fleet-proxy"),
    )
    for group, name in commands:
        command = root.commands[group].commands[name]  # type: ignore[attr-defined]
        offered = {option for param in command.params for option in param.opts}
        assert {"--header-timeout", "--idle-timeout", "--max-connections"} <= offered, group


def test_audit_serve_applies_the_options(tmp_path: Path) -> None:
    """``audit serve`` (as ``he serve``: both go through serve_until_signal)."""
    from tests.he_support import free_port

    key = tmp_path / "audit.key"
    save_note_signer(key, generate_note_key("test/conn"))
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "fedvault", "audit", "serve", "--db", str(tmp_path / "a.db"),
             "--key", str(key), "--port", str(port), "--header-timeout", "0.5",
             "--max-connections", "2"],
            stdout=sink, stderr=sink,
        )  # fmt: skip
    try:
        _wait_listening(port, server, log)
        time.sleep(0.2)  # the probe's connection is gone
        with connect(port) as silent, connect(port):
            with connect(port) as extra:
                data, _ = read_until_closed(extra, SLACK_S)
            assert data.startswith(b"HTTP/1.1 503 "), data
            data, took = read_until_closed(silent, 0.5 + SLACK_S)
        assert data == b""
        assert took >= 0.4
        got = httpx.get(f"http://127.0.0.1:{port}/v2/audit/checkpoint", timeout=5)
        assert got.status_code == 200, got.text
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_gateway_start_applies_the_options_on_both_doors(tmp_path: Path) -> None:
    from tests.gateway_support import make_home
    from tests.test_gateway_cli import gateway

    make_home(tmp_path)
    with gateway(tmp_path, "--header-timeout", "0.5", "--max-connections", "2") as (
        http_port,
        grpc_port,
        _,
    ):
        for port in (http_port, grpc_port):
            with connect(port) as silent:
                with connect(port) as second, connect(port) as third:
                    data, took = read_until_closed(third, SLACK_S)
                    assert took < SLACK_S
                    assert port == grpc_port or data.startswith(b"HTTP/1.1 503 "), data
                    second.close()
                # gRPC: HTTP/2 settings, then closed at the handshake deadline
                data, took = read_until_closed(silent, 0.5 + SLACK_S)
                assert took >= 0.4
                assert port == http_port or b"handshake timeout" in data, data
        live = httpx.get(f"http://127.0.0.1:{http_port}/v2/health/live", timeout=5)
        assert live.status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def _wait_listening(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert server.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)


def test_the_fleet_proxy_applies_the_guards(tmp_path: Path) -> None:
    """The partner-facing Fleet proxy: TLS handshake and header deadlines, the cap.

    A 2 s header timeout: the cap check needs two connections to stay open
    while a third completes its handshake, even on a loaded machine.
    """
    from fedvault.cli import federation as fed
    from tests.he_support import free_port

    paths = fed.FederationPaths(tmp_path / "home")
    fed.init_federation(paths, ["alpha"], ["127.0.0.1"])
    port = free_port()
    log = tmp_path / "proxy.log"
    with log.open("wb") as sink:
        proxy = subprocess.Popen(
            [sys.executable, "-m", "fedvault", "federation", "fleet-proxy",
             "--home", str(paths.home), "--listen", f"127.0.0.1:{port}",
             "--upstream", f"127.0.0.1:{free_port()}", "--header-timeout", "2",
             "--max-connections", "2"],
            stdout=sink, stderr=sink,
        )  # fmt: skip
    trusted = ssl.create_default_context(cafile=str(paths.ca_cert))
    try:
        _wait_listening(port, proxy, log)
        time.sleep(0.2)  # the probe's connection is gone
        with connect(port) as silent:  # no ClientHello: the handshake deadline
            data, took = read_until_closed(silent, 2 + SLACK_S)
        assert (data, took >= 1.9) == (b"", True)
        with connect(port) as a, trusted.wrap_socket(a, server_hostname="127.0.0.1") as one:
            with connect(port) as b, trusted.wrap_socket(b, server_hostname="127.0.0.1"):
                with connect(port) as c:
                    extra = trusted.wrap_socket(c, server_hostname="127.0.0.1")
                    data, _ = read_until_closed(extra, SLACK_S)
                    assert data.startswith(b"HTTP/1.1 503 "), data
            data, took = read_until_closed(one, 2 + SLACK_S)  # handshake, then silence
            assert data == b""
        control = httpx.get(f"https://127.0.0.1:{port}/v1/control/runs", verify=trusted)
        assert control.status_code == 404  # only the Fleet API goes through
    finally:
        proxy.terminate()
        assert proxy.wait(timeout=30) == 0, log.read_text(errors="replace")
