"""The audit log records the status the client was sent, or that it went away.

Issue 16, defect 8: a client that disconnected mid-body was audited as 500
(the app's fallback for a request it could not finish), and a malformed
chunked body — answered 400 by the HTTP server itself, before the app — was
audited as 500 too (or as the app's 200, when the app never read the body).
The gateway runs here through :mod:`server.http_serving`'s guarded protocol,
as ``fedvault gateway start`` runs it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from server.audit.records import AuditRecord, decode_entry
from server.gateway.audit import CLIENT_DISCONNECTED
from server.gateway.rest import create_rest_app
from server.http_serving import ConnectionLimits
from tests.gateway_support import MODEL, Harness, build
from tests.http_support import connect, guarded_server, read_until_closed

LIMITS = ConnectionLimits(header_timeout_s=5, idle_timeout_s=0.5)
PROMPT_S = 2.0  # the defect took 8 s; the request timeout is 30 s


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("gw-disconnect"))
    yield h
    h.log.close()


@pytest.fixture(scope="module")
def port(harness: Harness) -> Iterator[int]:
    with guarded_server(create_rest_app(harness.gw), LIMITS) as bound:
        yield bound


def _head(h: Harness, path: str, role: str, framing: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {h.tokens[role]}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()


def _next_record(h: Harness, before: int, limit_s: float = PROMPT_S) -> AuditRecord:
    """The entry appended after ``before``, waiting at most ``limit_s`` for it."""
    deadline = time.monotonic() + limit_s
    while h.log.size() <= before:
        assert time.monotonic() < deadline, f"no audit entry within {limit_s} s"
        time.sleep(0.01)
    ((_, entry),) = h.log.entries(before, before + 1)
    return decode_entry(entry)


ROUTES = [  # the infer fast path, and a FastAPI route with a JSON body
    (f"/v2/models/{MODEL}/infer", "analyst", "rest:infer"),
    ("/v2/admin/keys", "admin", "rest:keys_create"),
]


@pytest.mark.parametrize(("path", "role", "action"), ROUTES)
def test_disconnect_mid_body_is_audited_promptly_as_client_disconnected(
    harness: Harness, port: int, path: str, role: str, action: str
) -> None:
    before = harness.log.size()
    with connect(port) as sock:
        sock.sendall(_head(harness, path, role, "Content-Length: 100000") + b'{"inputs": [')
        time.sleep(0.1)  # the body is being read
    closed = time.monotonic()
    record = _next_record(harness, before)
    assert time.monotonic() - closed < PROMPT_S
    assert (record.action, record.outcome, record.status) == (action, CLIENT_DISCONNECTED, "none")
    assert record.response_digest is None  # nothing was sent
    assert record.error_type is None
    assert record.latency_ms is not None
    assert record.latency_ms < 1000 * PROMPT_S


@pytest.mark.parametrize(("path", "role", "action"), ROUTES)
def test_malformed_chunked_body_is_audited_as_the_400_sent(
    harness: Harness, port: int, path: str, role: str, action: str
) -> None:
    before = harness.log.size()
    with connect(port) as sock:
        sock.sendall(
            _head(harness, path, role, "Transfer-Encoding: chunked") + b'5\r\n{"inp\r\nzz\r\n'
        )
        sent, _ = read_until_closed(sock, PROMPT_S)
    assert sent.startswith(b"HTTP/1.1 400 "), sent
    record = _next_record(harness, before)
    assert (record.action, record.outcome, record.status) == (action, "error", "400")
    assert record.error_type == "http-400"
    assert record.response_digest is not None


def test_stalled_body_is_audited_as_the_408_sent(harness: Harness, port: int) -> None:
    before = harness.log.size()
    path = f"/v2/models/{MODEL}/infer"
    with connect(port) as sock:
        sock.sendall(_head(harness, path, "analyst", "Content-Length: 1000") + b'{"inputs": [')
        sent, _ = read_until_closed(sock, LIMITS.idle_timeout_s + PROMPT_S)
    assert sent.startswith(b"HTTP/1.1 408 "), sent
    record = _next_record(harness, before)
    assert (record.action, record.outcome, record.status) == ("rest:infer", "error", "408")


def test_a_whole_request_is_still_audited_as_answered(harness: Harness, port: int) -> None:
    import httpx

    before = harness.log.size()
    got = httpx.get(
        f"http://127.0.0.1:{port}/v2/models/{MODEL}",
        headers={"Authorization": f"Bearer {harness.tokens['analyst']}"},
    )
    assert got.status_code == 200
    record = _next_record(harness, before)
    assert (record.outcome, record.status) == ("ok", "200")


def test_the_new_outcome_is_one_the_filters_accept() -> None:
    """`audit search --outcome` and the console's filter refuse outcomes they do not know."""
    from fedvault.cli.audit import OUTCOMES
    from server.console.auditview import OUTCOMES as CONSOLE_OUTCOMES

    assert CLIENT_DISCONNECTED in OUTCOMES
    assert CLIENT_DISCONNECTED in CONSOLE_OUTCOMES
