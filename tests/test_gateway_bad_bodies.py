"""Parser-breaking infer bodies are 400 problems on both infer routes, never 500 (issue 16 #7).

And what *is* a 500 — an exception outside the error hierarchy — is logged
(type and stack, not its message) and audited, not swallowed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from server.audit.records import AuditRecord, decode_entry
from server.gateway.codec import OFFLOAD_BODY_BYTES
from server.gateway.rest import create_rest_app
from tests.gateway_support import MODEL, Harness, build
from tests.he_support import live_server

ROUTES = (f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/2/infer")
DEPTH = 50_000


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("gw-bad-bodies"))
    yield h
    h.gw.codec.close()
    h.log.close()


@pytest.fixture(scope="module")
def url(harness: Harness) -> Iterator[str]:
    with live_server(create_rest_app(harness.gw)) as base:
        yield base


def _doc(
    data: str, *, datatype: str = "FP32", shape: str = "[1,30]", name: str = "features"
) -> str:
    return (
        f'{{"inputs":[{{"name":"{name}","shape":{shape},"datatype":"{datatype}","data":{data}}}]}}'
    )


def _row(first: str) -> str:
    return "[" + first + ",1" * 29 + "]"


BODIES: dict[str, bytes] = {
    "deep arrays": _doc("[" * DEPTH + "]" * DEPTH).encode(),
    "deep objects": (
        '{"inputs":[{"name":"features","shape":[1,30],"datatype":"FP32","parameters":'
        + '{"a":' * DEPTH
        + "1"
        + "}" * DEPTH
        + ',"data":[1]}]}'
    ).encode(),
    # Larger than the inline limit: decoded in a codec worker process, same answer.
    "deep arrays, decoded in a worker": _doc(
        "[" * (OFFLOAD_BODY_BYTES // 2 + 1) + "]" * (OFFLOAD_BODY_BYTES // 2 + 1)
    ).encode(),
    "deep, unclosed": _doc("[" * DEPTH).encode(),
    "huge exponent": _doc(_row("1e999999")).encode(),
    "huge negative exponent list": _doc("[" + ",".join(["-1e99999"] * 30) + "]").encode(),
    "huge integer": _doc(_row("9" * 5000)).encode(),
    "huge exponent INT64": _doc("[1e999999]", datatype="INT64", shape="[1]").encode(),
    "lone surrogate in a name": _doc(_row("1"), name="\\ud800").encode(),
    "lone surrogate in BYTES data": _doc('["\\udc00"]', datatype="BYTES", shape="[1]").encode(),
    "lone surrogate in FP32 data": _doc('["\\ud800"]', shape="[1]").encode(),
    "raw surrogate bytes (invalid UTF-8)": _doc(_row("1"), name="\xed\xa0\x80").encode("latin-1"),
    "invalid UTF-8": b'{"inputs":[{"name":"\xff\xfe"}]}',
    "NaN literal": _doc(_row("NaN")).encode(),
    "Infinity literal": _doc(_row("-Infinity")).encode(),
    "trailing garbage": _doc(_row("1")).encode() + b" garbage",
    "trailing garbage, decoded in a worker": (
        _doc("[" + ",".join([_row("1")] * 2200) + "]", shape="[2200,30]").encode() + b"]"
    ),
    "two documents": _doc(_row("1")).encode() * 2,
    "truncated": _doc(_row("1")).encode()[:-3],
    "empty": b"",
    "not an object": b"[1, 2, 3]",
    "control character in a string": _doc(_row("1"), name="feat\x01ures").encode(),
}


def _auth(h: Harness) -> dict[str, str]:
    return {"Authorization": f"Bearer {h.tokens['analyst']}"}


def _last(h: Harness) -> AuditRecord:
    size = h.log.size()
    ((_, entry),) = h.log.entries(size - 1, size)
    return decode_entry(entry)


def _assert_400(r: httpx.Response) -> None:
    assert r.status_code == 400, r.text[:300]
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["type"] == "urn:fedvault:problem:invalid-request"
    assert problem["error"] == problem["detail"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(BODIES))
def test_parser_breaking_bodies_are_400(harness: Harness, url: str, route: str, case: str) -> None:
    assert len(BODIES["trailing garbage, decoded in a worker"]) > OFFLOAD_BODY_BYTES
    r = httpx.post(url + route, content=BODIES[case], headers=_auth(harness), timeout=30)
    _assert_400(r)
    assert _last(harness).status == "400"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "header",
    [
        b"\xb2",  # '²' in latin-1: str.isdigit() says yes, int() refuses (was a 500)
        b"\xb9",  # '¹'
        b"1" * 5000,  # past int()'s 4,300-digit limit (was a 500)
        b"-1",
        b"",
        b"1e3",
        b"99999999999999999999",
    ],
)
def test_bad_binary_header_lengths_are_400(
    harness: Harness, url: str, route: str, header: bytes
) -> None:
    body = _doc(_row("1")).encode()
    r = httpx.post(
        url + route,
        content=body,
        headers=[
            (b"Authorization", _auth(harness)["Authorization"].encode()),
            (b"Inference-Header-Content-Length", header),
        ],
    )
    _assert_400(r)


@pytest.mark.parametrize("route", ROUTES)
def test_deep_json_header_of_a_binary_request_is_400(
    harness: Harness, url: str, route: str
) -> None:
    head = BODIES["deep arrays"]
    r = httpx.post(
        url + route,
        content=head + b"\x00" * 120,
        headers={**_auth(harness), "Inference-Header-Content-Length": str(len(head))},
    )
    _assert_400(r)


def test_an_unexpected_exception_is_logged_audited_and_a_bare_500(
    harness: Harness, url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    marker = "fvk_not-for-logs 42.5"

    def broken(*_: object) -> None:
        raise ValueError(f"could not convert string to float: {marker!r}")

    monkeypatch.setattr(harness.gw.service, "infer", broken)
    with caplog.at_level(logging.ERROR, logger="server.problem"):
        r = httpx.post(url + ROUTES[0], content=_doc(_row("1")), headers=_auth(harness))
    assert r.status_code == 500
    assert r.json()["detail"] == r.json()["error"] == "internal error"
    assert marker not in r.text
    (record,) = [rec for rec in caplog.records if rec.name == "server.problem"]
    logged = json.loads(record.getMessage())
    assert logged["event"] == "unexpected_error"
    assert logged["error"] == "builtins.ValueError"
    assert logged["request_id"] == r.headers["x-request-id"]
    assert any("in broken" in frame for frame in logged["chain"][0]["frames"])
    assert "not-for-logs" not in record.getMessage()
    audited = _last(harness)
    assert (audited.status, audited.request_id) == ("500", r.headers["x-request-id"])
