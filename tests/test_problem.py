"""server/problem.py: every fedvault HTTP app's errors as problem+json with OIP's ``error``.

Any app that installs the handlers (gateway, stand-alone HE and audit servers)
answers the same way; these check a bare app so nothing else is in the way.
"""

from __future__ import annotations

import json
import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fedvault.errors import (
    FedvaultError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
)
from server.problem import PROBLEM_JSON, Problem, install_problem_handlers

MARKER = "fvk_do-not-log-me 12.5"


def _app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/missing")
    async def missing() -> None:
        raise NotFoundError("no model named 'x'")

    @app.get("/ours")
    async def ours() -> None:
        raise FedvaultError("/secret/path/inside.db is locked")

    @app.get("/limited")
    async def limited() -> None:
        raise RateLimitedError("slow down", retry_after_s=1.2)

    @app.post("/big")
    async def big() -> None:
        raise PayloadTooLargeError("request body exceeds 10 bytes")

    @app.get("/typed")
    async def typed(n: int) -> int:
        return n

    @app.get("/bug")
    async def bug() -> None:
        raise ValueError(f"could not convert {MARKER!r}") from KeyError(MARKER)

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(_app(), raise_server_exceptions=False)


def _problem(r: object, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text  # type: ignore[attr-defined]
    assert r.headers["content-type"] == PROBLEM_JSON  # type: ignore[attr-defined]
    body: dict[str, object] = r.json()  # type: ignore[attr-defined]
    Problem.model_validate(body)  # the documented schema, ``error`` included
    assert body["status"] == status
    assert body["error"] == body["detail"]  # OIP clients read only ``error``
    return body


@pytest.mark.parametrize(
    ("method", "path", "status", "detail"),
    [
        ("GET", "/missing", 404, "no model named 'x'"),
        ("GET", "/ours", 500, "internal error"),  # our 500s keep their messages to the log
        ("GET", "/limited", 429, "slow down"),
        ("POST", "/big", 413, "request body exceeds 10 bytes"),
        ("GET", "/typed?n=x", 400, "invalid or missing parameter(s): n"),
        ("GET", "/no/such/route", 404, "no such endpoint"),
        ("DELETE", "/missing", 405, "method not allowed here"),
    ],
)
def test_every_error_is_problem_json_with_oip_error_member(
    client: TestClient, method: str, path: str, status: int, detail: str
) -> None:
    body = _problem(client.request(method, path), status)
    assert body["detail"] == detail


def test_405_keeps_allow_and_429_retry_after(client: TestClient) -> None:
    assert client.delete("/missing").headers["allow"] == "GET"
    assert client.get("/limited").headers["retry-after"] == "2"


def test_unexpected_exception_is_a_bare_500_and_logged_without_its_message(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="server.problem"):
        r = client.get("/bug", headers={"X-Request-Id": "req-42"})
    body = _problem(r, 500)
    assert body["detail"] == "internal error"
    assert body["title"] == "Internal server error (the server's log has the request id)."
    assert MARKER not in r.text
    records = [rec for rec in caplog.records if rec.name == "server.problem"]
    assert len(records) == 1
    logged = json.loads(records[0].getMessage())
    assert logged["event"] == "unexpected_error"
    assert logged["error"] == "builtins.ValueError"
    assert logged["request_id"] == "req-42"
    assert [c["type"] for c in logged["chain"]] == ["builtins.ValueError", "builtins.KeyError"]
    assert any("tests/test_problem.py" in f and "in bug" in f for f in logged["chain"][0]["frames"])
    assert "do-not-log-me" not in records[0].getMessage()
