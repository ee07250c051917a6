"""ModelStreamInfer: Triton's bidirectional stream, every message authenticated and audited.

All against the real gateway (grpc.aio server, SQLite key store, audit log):
stock tritonclient's ``start_stream`` / ``async_stream_infer`` in a child
process, and our own stubs for what needs the test to act between messages
(revocation, rate limit, audit outage).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.audit.records import AuditRecord, decode_entry
from server.gateway.auth import RateLimiter
from server.gateway.grpc_api import STREAM_WINDOW
from server.gateway.keys import GatewayStore
from server.gateway.pb import grpc_service_pb2 as pb
from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway_support import (
    MODEL,
    OTHER,
    Harness,
    build,
    expected_logits,
    features,
    grpc_server,
)

ROOT = Path(__file__).resolve().parents[1]
ACTION = "grpc:ModelStreamInfer"


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("gw-stream"))
    yield h
    h.log.close()


@pytest.fixture(scope="module")
def address(harness: Harness) -> Iterator[str]:
    with grpc_server(harness) as addr:
        yield addr


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _md(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _request(
    x: np.ndarray,  # type: ignore[type-arg]
    request_id: str,
    model: str = MODEL,
) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    return req


def _records_since(h: Harness, size: int) -> list[AuditRecord]:
    return [decode_entry(e) for _, e in h.log.entries(size, h.log.size())]


class Duplex:
    """A stream the test drives message by message (send one, read its answer)."""

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub, token: str) -> None:
        self._requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        self._answers = stub.ModelStreamInfer(
            iter(self._requests.get, None), metadata=_md(token), timeout=60
        )

    def send(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        self._requests.put(request)
        return next(self._answers)  # type: ignore[no-any-return]

    def close(self) -> list[pb.ModelStreamInferResponse]:
        self._requests.put(None)
        return list(self._answers)


# ------------------------------------------------------------------ tritonclient
def test_tritonclient_stream(harness: Harness, address: str) -> None:
    """Stock client: outputs right, a bad message fails alone, refusals as Triton reports them."""
    x = features(3)
    size = harness.log.size()
    doc = {"x": x.tolist(), "tokens": {r: harness.tokens[r] for r in ("analyst", "auditor")}}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.gateway_clients.triton_stream", address, MODEL],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    want = expected_logits(harness, "2", x)

    ok = out["ok"]
    assert len(ok) == 5
    for i in (0, 1, 3, 4):  # in request order
        assert ok[i]["id"] == f"m{i}"
        assert ok[i]["version"] == "2"
        np.testing.assert_allclose(ok[i]["logits"], want, rtol=1e-5, atol=1e-5)
        assert ok[i]["class"] == want.argmax(axis=1).tolist()
    assert ok[2]["error"].startswith("INVALID_ARGUMENT: ")
    assert "shape" in ok[2]["error"]

    assert [a["error"].split(":")[0] for a in out["auditor"]] == ["PERMISSION_DENIED"] * 2
    assert out["nokey"] == [
        {"error": "missing Authorization: Bearer <API key>", "status": "StatusCode.UNAUTHENTICATED"}
    ]
    assert [b["status"] for b in out["badkey"]] == ["StatusCode.UNAUTHENTICATED"]

    # One record per streamed message, plus one per refused stream start.
    records = [r for r in _records_since(harness, size) if r.action == ACTION]
    analyst = [r for r in records if r.role == "analyst"]
    assert [r.status for r in analyst] == ["OK", "OK", "INVALID_ARGUMENT", "OK", "OK"]
    assert [r.request_id for r in analyst] == [f"m{i}" for i in range(5)]
    assert [r.status for r in records if r.role == "auditor"] == ["PERMISSION_DENIED"] * 2
    refused = [r for r in records if r.actor == "anonymous"]
    assert [(r.status, r.outcome) for r in refused] == [("UNAUTHENTICATED", "denied")] * 2
    assert len(records) == 9


# ------------------------------------------------------------- per-message audit
def test_every_message_has_its_own_audit_record(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    x = features(2)
    requests = [_request(x, f"r{i}") for i in range(4)]
    requests[2].inputs[0].datatype = "FP64"
    size = harness.log.size()
    answers = list(stub.ModelStreamInfer(iter(requests), metadata=_md(harness.tokens["analyst"])))
    assert [a.error_message.split(":")[0] for a in answers] == ["", "", "INVALID_ARGUMENT", ""]
    assert answers[2].infer_response.id == "r2"  # the failed message is identifiable
    assert not answers[2].infer_response.outputs
    records = _records_since(harness, size)
    assert [r.action for r in records] == [ACTION] * 4
    assert [(r.status, r.outcome) for r in records] == [
        ("OK", "ok"),
        ("OK", "ok"),
        ("INVALID_ARGUMENT", "error"),
        ("OK", "ok"),
    ]
    assert [r.request_id for r in records] == ["r0", "r1", "r2", "r3"]
    assert all(r.role == "analyst" and r.protocol == "grpc" for r in records)
    assert records[0].resource == f"model:{MODEL}/2"
    assert records[2].error_type == "urn:fedvault:problem:invalid-request"
    assert all(r.request_digest for r in records)
    assert [bool(r.response_digest) for r in records] == [True, True, False, True]
    assert len({r.request_digest for r in records}) == 4  # each message's own bytes
    logits = np.frombuffer(answers[3].infer_response.raw_output_contents[0], dtype="<f4")
    np.testing.assert_allclose(
        logits.reshape(2, 2), expected_logits(harness, "2", x), rtol=1e-5, atol=1e-5
    )


def _held_stream(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub, n: int, hold_until: int
) -> list[pb.ModelStreamInferResponse]:
    """Send n messages at once while appends wait until ``hold_until`` are waiting."""
    requests = [_request(features(1), f"w{i}") for i in range(n)]
    sink = harness.sink
    sink.hold_until, sink.hold_s, sink.max_in_flight = hold_until, 0.1, 0
    try:
        return list(stub.ModelStreamInfer(iter(requests), metadata=_md(harness.tokens["analyst"])))
    finally:
        sink.hold_until, sink.hold_s = 0, 0.0


def test_messages_overlap_their_audit_commits_within_a_window(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """A slow commit does not set the stream's pace: exactly the window's worth of
    messages wait on it together, no more, and answers keep their order."""
    n = 3 * STREAM_WINDOW
    size = harness.log.size()
    answers = _held_stream(harness, stub, n, hold_until=STREAM_WINDOW)
    assert [a.infer_response.id for a in answers] == [f"w{i}" for i in range(n)]
    assert all(a.error_message == "" for a in answers)
    # Appends are held until STREAM_WINDOW wait, then 0.1 s more: none beyond it arrive.
    assert harness.sink.max_in_flight == STREAM_WINDOW
    records = _records_since(harness, size)
    assert sorted(r.request_id or "" for r in records) == sorted(f"w{i}" for i in range(n))
    assert {r.status for r in records} == {"OK"}


def test_the_window_is_bounded_in_bytes_too(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """Large messages: no more request bytes in flight than the body limit."""
    one = _request(features(1), "w0").ByteSize()
    limits = harness.gw.limits
    harness.gw.limits = dataclasses.replace(limits, max_body_bytes=3 * one + one // 2)
    try:
        answers = _held_stream(harness, stub, 12, hold_until=3)
    finally:
        harness.gw.limits = limits
    assert all(a.error_message == "" for a in answers)
    assert harness.sink.max_in_flight == 3


def test_a_cancelled_stream_still_audits_the_message_it_started(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """The client gives up while its message awaits the commit: the record is written."""
    size = harness.log.size()
    harness.sink.delay_s = 0.3
    try:
        call = stub.ModelStreamInfer(
            iter([_request(features(1), "gone")]), metadata=_md(harness.tokens["analyst"])
        )
        time.sleep(0.1)  # the message is in its append now
        call.cancel()
        deadline = time.monotonic() + 5
        while harness.log.size() == size and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        harness.sink.delay_s = 0.0
    assert [(r.request_id, r.status) for r in _records_since(harness, size)] == [("gone", "OK")]


def test_bad_keys_refuse_the_stream(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """No, wrong, revoked or expired key: UNAUTHENTICATED before any message is handled."""
    bad: list[tuple[tuple[str, str], ...]] = [
        (),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer fvk_000000000000_" + "x" * 43),),
        _md(harness.tokens["revoked"]),
        _md(harness.tokens["expired"]),
    ]
    for md in bad:
        size = harness.log.size()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ModelStreamInfer(iter([_request(features(1), "x")] * 3), metadata=md))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
        assert harness.tokens["analyst"] not in (info.value.details() or "")
        (rec,) = _records_since(harness, size)  # the refusal, and no message
        assert (rec.action, rec.status, rec.outcome) == (ACTION, "UNAUTHENTICATED", "denied")


def test_grants_are_checked_per_message(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """A key granted OTHER only: MODEL's messages are denied, OTHER's answered, same stream."""
    x = features(1)
    requests = [_request(x, "o0", OTHER), _request(x, "m0"), _request(x, "o1", OTHER)]
    answers = list(
        stub.ModelStreamInfer(iter(requests), metadata=_md(harness.tokens["analyst-other"]))
    )
    assert [a.error_message.split(":")[0] for a in answers] == ["", "PERMISSION_DENIED", ""]
    assert answers[0].infer_response.model_name == OTHER
    admin = list(stub.ModelStreamInfer(iter(requests[:1]), metadata=_md(harness.tokens["admin"])))
    assert admin[0].error_message.startswith("PERMISSION_DENIED: role 'admin' may not infer")


# ------------------------------------------------------------------ mid-stream
def test_revocation_ends_an_open_stream(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """Revoked by another connection (as `fedvault keys revoke`): the next message
    is refused and audited, then the stream ends UNAUTHENTICATED."""
    token, key = harness.gw.store.create_key("analyst", models=frozenset({MODEL}))
    stream = Duplex(stub, token)
    x = features(1)
    assert stream.send(_request(x, "before")).error_message == ""
    other = GatewayStore(harness.gw.store.path)
    other.revoke(key.key_id)
    other.close()
    size = harness.log.size()
    answer = stream.send(_request(x, "after"))
    assert answer.error_message == "UNAUTHENTICATED: API key revoked"
    assert answer.infer_response.id == "after"
    assert not answer.infer_response.outputs
    with pytest.raises(grpc.RpcError) as info:
        stream.close()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == "API key revoked"
    records = _records_since(harness, size)
    assert [(r.status, r.outcome, r.actor, r.request_id) for r in records] == [
        ("UNAUTHENTICATED", "denied", "anonymous", "after")
    ]


def test_rate_limit_per_message(harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    limiter = harness.gw.authenticator.limiter
    harness.gw.authenticator.limiter = RateLimiter(0.001, 2.0)  # two messages, then refuse
    try:
        requests = [_request(features(1), f"q{i}") for i in range(3)]
        answers = list(
            stub.ModelStreamInfer(iter(requests), metadata=_md(harness.tokens["analyst"]))
        )
    finally:
        harness.gw.authenticator.limiter = limiter
    assert [a.error_message for a in answers[:2]] == ["", ""]
    assert answers[2].error_message.startswith("RESOURCE_EXHAUSTED: rate limit")
    assert "retry after" in answers[2].error_message


def test_audit_outage_fails_closed(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """The message whose record cannot be written gets an error; the stream ends UNAVAILABLE."""
    stream = Duplex(stub, harness.tokens["analyst"])
    x = features(1)
    assert stream.send(_request(x, "ok")).error_message == ""
    harness.sink.broken = True
    try:
        answer = stream.send(_request(x, "lost"))
        assert answer.error_message.startswith("UNAVAILABLE: ")
        assert not answer.infer_response.outputs
        with pytest.raises(grpc.RpcError) as info:
            stream.close()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
    finally:
        harness.sink.broken = False
    again = list(
        stub.ModelStreamInfer(iter([_request(x, "back")]), metadata=_md(harness.tokens["analyst"]))
    )
    assert again[0].error_message == ""
    assert stub.ServerReady(pb.ServerReadyRequest()).ready


def test_stream_metrics(harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    list(
        stub.ModelStreamInfer(
            iter([_request(features(1), "m")]), metadata=_md(harness.tokens["analyst"])
        )
    )
    text = harness.gw.metrics.exposition().decode()
    assert (
        'fedvault_gateway_requests_total{code="OK",endpoint="ModelStreamInfer",'
        f'model="{MODEL}",protocol="grpc",version="2"}}'
    ) in text
