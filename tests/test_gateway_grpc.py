"""Gateway gRPC: the same core as REST behind ``inference.GRPCInferenceService``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from server.audit.records import AuditRecord, decode_entry
from server.gateway.auth import RateLimiter
from server.gateway.pb import grpc_service_pb2 as pb
from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway_support import (
    MODEL,
    Harness,
    build,
    expected_logits,
    features,
    grpc_server,
)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("gw-grpc"))
    yield h
    h.log.close()


@pytest.fixture(scope="module")
def stub(harness: Harness) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc_server(harness) as address, grpc.insecure_channel(address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _md(h: Harness, role: str = "analyst") -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {h.tokens[role]}"),)


def _request(x: np.ndarray, raw: bool = True) -> pb.ModelInferRequest:  # type: ignore[type-arg]
    req = pb.ModelInferRequest(model_name=MODEL, id="r1")
    t = req.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        t.contents.fp32_contents.extend(x.ravel().tolist())
    return req


def test_health_and_metadata(harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=_md(harness))
    assert meta.name == "fedvault"
    m = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), metadata=_md(harness))
    assert list(m.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [
        ("features", "FP32", [-1, 30])
    ]
    assert [t.name for t in m.outputs] == ["logits", "probabilities", "class"]
    ready = stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="1"), metadata=_md(harness))
    assert ready.ready


@pytest.mark.parametrize("raw", [True, False])
def test_infer_raw_and_typed_contents(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub, raw: bool
) -> None:
    x = features(3)
    resp = stub.ModelInfer(_request(x, raw), metadata=_md(harness))
    assert (resp.model_name, resp.model_version, resp.id) == (MODEL, "2", "r1")
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [
        ("logits", "FP32", [3, 2]),
        ("probabilities", "FP32", [3, 2]),
        ("class", "INT64", [3]),
    ]
    logits = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(3, 2)
    np.testing.assert_allclose(logits, expected_logits(harness, "2", x), rtol=1e-5, atol=1e-5)
    cls = np.frombuffer(resp.raw_output_contents[2], dtype="<i8")
    assert cls.tolist() == logits.argmax(axis=1).tolist()


def test_errors_map_to_status_codes(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    x = features(2)
    cases: list[tuple[pb.ModelInferRequest, tuple[tuple[str, str], ...], grpc.StatusCode]] = []
    wrong_name = _request(x)
    wrong_name.inputs[0].name = "pixels"
    cases.append((wrong_name, _md(harness), grpc.StatusCode.INVALID_ARGUMENT))
    wrong_type = _request(x)
    wrong_type.inputs[0].datatype = "FP64"
    cases.append((wrong_type, _md(harness), grpc.StatusCode.INVALID_ARGUMENT))
    wrong_shape = _request(x)
    wrong_shape.inputs[0].shape[:] = [2, 29]
    cases.append((wrong_shape, _md(harness), grpc.StatusCode.INVALID_ARGUMENT))
    short = _request(x)
    short.raw_input_contents[0] = b"\0" * 8
    cases.append((short, _md(harness), grpc.StatusCode.INVALID_ARGUMENT))
    unknown = _request(x)
    unknown.model_name = "nope"
    cases.append((unknown, _md(harness, "admin"), grpc.StatusCode.PERMISSION_DENIED))
    cases.append((_request(x), (), grpc.StatusCode.UNAUTHENTICATED))
    cases.append(
        (_request(x), (("authorization", "Bearer fvk_x"),), grpc.StatusCode.UNAUTHENTICATED)
    )
    cases.append((_request(x), _md(harness, "auditor"), grpc.StatusCode.PERMISSION_DENIED))
    bad_version = _request(x)
    bad_version.model_version = "7"
    cases.append((bad_version, _md(harness), grpc.StatusCode.NOT_FOUND))
    for req, md, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, metadata=md)
        assert info.value.code() == code, (code, info.value.details())
        assert harness.tokens["analyst"] not in (info.value.details() or "")


def test_grpc_calls_are_audited(harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    stub.ModelInfer(_request(features(1)), metadata=_md(harness))
    size = harness.log.size()
    ((_, entry),) = harness.log.entries(size - 1, size)
    rec = decode_entry(entry)
    assert rec.action == "grpc:ModelInfer"
    assert rec.role == "analyst"
    assert rec.resource == f"model:{MODEL}/2"
    assert (rec.outcome, rec.status, rec.error_type, rec.protocol) == ("ok", "OK", None, "grpc")
    assert rec.peer is not None
    assert "127.0.0.1" in rec.peer
    assert rec.latency_ms is not None
    assert rec.request_digest
    assert rec.response_digest
    harness.sink.broken = True
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_request(features(1)), metadata=_md(harness))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
    finally:
        harness.sink.broken = False
    stub.ModelInfer(_request(features(1)), metadata=_md(harness))
    assert stub.ServerReady(pb.ServerReadyRequest()).ready


def _last_record(harness: Harness) -> AuditRecord:
    size = harness.log.size()
    ((_, entry),) = harness.log.entries(size - 1, size)
    return decode_entry(entry)


def test_unary_audit_records_carry_a_request_id(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """Like REST: x-request-id metadata, else the OIP request's id, else a generated one."""
    req = _request(features(1))
    req.id = "oip-7"
    assert stub.ModelInfer(req, metadata=_md(harness)).id == "oip-7"
    rec = _last_record(harness)
    assert (rec.action, rec.request_id) == ("grpc:ModelInfer", "oip-7")

    stub.ModelInfer(req, metadata=(*_md(harness), ("x-request-id", "trace-1")))
    assert _last_record(harness).request_id == "trace-1"  # the header wins, as on REST

    req.id = ""
    _, call = stub.ModelInfer.with_call(req, metadata=_md(harness))
    generated = _last_record(harness).request_id
    assert generated is not None
    assert len(generated) == 32
    # Echoed in the trailers (REST: the X-Request-ID header), so the caller can find it.
    assert ("x-request-id", generated) in tuple(call.trailing_metadata())

    with pytest.raises(grpc.RpcError) as info:  # refused calls are findable too
        stub.ModelInfer(_request(features(1)), metadata=_md(harness, "auditor"))
    rec = _last_record(harness)
    assert (rec.status, rec.request_id) == ("PERMISSION_DENIED", "r1")
    assert ("x-request-id", "r1") in tuple(info.value.trailing_metadata())

    stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=_md(harness))
    rec = _last_record(harness)
    assert rec.action == "grpc:ServerMetadata"
    assert rec.request_id is not None


def test_rate_limited_call_says_when_to_retry(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """RESOURCE_EXHAUSTED with a retry-after trailer (REST: 429 + Retry-After), audited."""
    limiter = harness.gw.authenticator.limiter
    harness.gw.authenticator.limiter = RateLimiter(0.001, 1.0)  # one call, then refuse
    try:
        stub.ModelInfer(_request(features(1)), metadata=_md(harness))
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_request(features(1)), metadata=_md(harness))
    finally:
        harness.gw.authenticator.limiter = limiter
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(info.value.trailing_metadata())
    assert int(trailers["retry-after"]) >= 1
    rec = _last_record(harness)
    assert (rec.status, rec.outcome, rec.request_id) == ("RESOURCE_EXHAUSTED", "error", "r1")
    assert trailers["x-request-id"] == "r1"


@pytest.mark.parametrize("request_id", ["réq-1", "a\nb"])
def test_an_oip_id_that_is_no_metadata_value_is_recorded_not_echoed(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub, request_id: str
) -> None:
    """grpc refuses a trailer value outside printable ASCII: the call must still succeed."""
    req = _request(features(1))
    req.id = request_id
    answer, call = stub.ModelInfer.with_call(req, metadata=_md(harness))
    assert answer.id == request_id
    assert call.code() == grpc.StatusCode.OK
    assert "x-request-id" not in dict(call.trailing_metadata())
    assert _last_record(harness).request_id == request_id


def test_a_cancelled_call_is_still_audited(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """The client gives up while the call awaits its audit commit: the record is written."""
    size = harness.log.size()
    req = _request(features(1))
    req.id = "cancelled-unary"
    harness.sink.delay_s = 0.3
    try:
        future = stub.ModelInfer.future(req, metadata=_md(harness))
        time.sleep(0.1)  # the call is in its append now
        assert future.cancel()
        deadline = time.monotonic() + 5
        while harness.log.size() == size and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        harness.sink.delay_s = 0.0
    assert (_last_record(harness).request_id, _last_record(harness).status) == (
        "cancelled-unary",
        "OK",
    )


def test_a_second_server_on_the_same_port_is_refused(harness: Harness) -> None:
    """grpcio sets SO_REUSEPORT by default: a second gateway on a taken port bound
    silently and took part of the calls. Now the bind fails, as a ConfigError."""
    import asyncio

    from fedvault.errors import ConfigError
    from server.gateway.grpc_api import start_grpc_server

    with grpc_server(harness) as address:

        async def second() -> None:
            await start_grpc_server(harness.gw, address)

        with pytest.raises(ConfigError, match=f"cannot listen for gRPC on {address}"):
            asyncio.run(second())


def test_an_unexpected_exception_is_logged_audited_and_internal(
    harness: Harness,
    stub: pb_grpc.GRPCInferenceServiceStub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug outside the error hierarchy: INTERNAL "internal error" to the caller,
    one log line with its class and frames (never its message), and audited."""
    marker = "fvk_not-for-logs 42.5"

    def broken(*_: object) -> None:
        raise ValueError(f"could not convert string to float: {marker!r}")

    monkeypatch.setattr(harness.gw.service, "infer", broken)
    with caplog.at_level(logging.ERROR, logger="server.problem"):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_request(features(1)), metadata=_md(harness))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error"
    (record,) = [rec for rec in caplog.records if rec.name == "server.problem"]
    logged = json.loads(record.getMessage())
    assert (logged["event"], logged["error"]) == ("unexpected_error", "builtins.ValueError")
    assert any("in broken" in frame for frame in logged["chain"][0]["frames"])
    assert "not-for-logs" not in record.getMessage()
    rec = _last_record(harness)
    assert (rec.action, rec.status) == ("grpc:ModelInfer", "INTERNAL")
    assert logged["request_id"] == rec.request_id


def test_an_audit_failure_is_logged_by_class_only(
    harness: Harness, stub: pb_grpc.GRPCInferenceServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    harness.sink.broken = True
    try:
        with caplog.at_level(logging.ERROR, logger="server.gateway.audit"):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(_request(features(1)), metadata=_md(harness))
    finally:
        harness.sink.broken = False
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    (record,) = [rec for rec in caplog.records if rec.name == "server.gateway.audit"]
    assert "audit append failed" in record.getMessage()
    assert "fail closed" in record.getMessage()
