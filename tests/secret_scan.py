"""The session-wide secrets check of issue 16: what the tests made must not leak.

After the whole suite, every log, store file, export and error answer the
tests produced is searched for three kinds of secret:

- a whole API token (the ``fvk_`` format; the key id alone is public),
- a PEM or OpenSSH private-key block (outside SQLite files),
- the content of any private-key file the run created (``*.key``: model
  signing and encryption keys, audit signing keys, TLS and node keys): its
  longest base64 line, or its whole text, must appear in no log, export or
  error answer.

Error answers are collected as they arrive: :func:`install` wraps httpx's
``send`` (sync and async) and ``grpc.insecure_channel``/``secure_channel`` with
observers that append every 4xx/5xx body and the details of every unary gRPC
call that ends non-OK to ``error-answers.jsonl`` in the session's base
temporary directory (streams and ``grpc.aio`` channels are not observed;
their servers' logs are scanned);
CLI runs that fail add their stderr (:func:`record_cli_failure`). The
observers change nothing about the calls they see; they only read the answer.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

ERROR_ANSWERS = "error-answers.jsonl"

# A whole API key (prefix, key id and secret): the key id alone is public.
_API_TOKEN = re.compile(rb"fvk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,128}")
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# What processes leave behind that must never hold a secret: logs, stores
# (audit entries, key hashes, ledgers), exports and the error answers. Token
# and key *files* that tests write on purpose have other names (.token, .key, .pem).
_SCANNED = {".log", ".jsonl", ".json", ".db", ".sqlite", ".txt", ".out", ".err"}
# Key-file contents are searched for in text outputs only (one substring search
# per key and file; the stores are covered by the two patterns above).
_TEXT_OUTPUTS = {".log", ".jsonl", ".json", ".txt", ".out", ".err"}
_SCAN_LIMIT = 64 << 20
_KEY_FILE_LIMIT = 16 << 10
_MIN_SECRET = 24  # shorter strings could occur by chance

_lock = threading.Lock()
_sink: Path | None = None


def _record(kind: str, status: str, text: str) -> None:
    if _sink is None:
        return
    line = json.dumps({"kind": kind, "status": status, "text": text}) + "\n"
    with _lock, _sink.open("a", encoding="utf-8") as out:
        out.write(line)


def record_cli_failure(returncode: int, stderr: str) -> None:
    """A CLI run that failed: its stderr is an error answer too.

    Its arguments are not recorded: a test may pass a token on purpose.
    """
    if returncode != 0:
        _record("cli", str(returncode), stderr)


def _observe_http(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            body = response.content  # set: send() read it, unless the caller streams
        except httpx.ResponseNotRead:
            return
        _record("http", str(response.status_code), body.decode("utf-8", "replace"))


class _ErrorObserver(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records the details of every unary call that ends in a non-OK status."""

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        outcome = continuation(client_call_details, request)

        def seen(call: Any) -> None:
            try:
                code = call.code()
                if code is not None and code != grpc.StatusCode.OK:
                    _record("grpc", code.name, call.details() or "")
            except Exception:  # noqa: S110 - an observer must never break the call
                pass

        outcome.add_done_callback(seen)
        return outcome


def install(monkeypatch: pytest.MonkeyPatch, base: Path) -> None:
    """Start collecting error answers into ``base``/``error-answers.jsonl``."""
    global _sink
    _sink = base / ERROR_ANSWERS
    _sink.touch()

    sync_send = httpx.Client.send
    async_send = httpx.AsyncClient.send

    def send(self: httpx.Client, *args: Any, **kwargs: Any) -> httpx.Response:
        response = sync_send(self, *args, **kwargs)
        _observe_http(response)
        return response

    async def asend(self: httpx.AsyncClient, *args: Any, **kwargs: Any) -> httpx.Response:
        response = await async_send(self, *args, **kwargs)
        _observe_http(response)
        return response

    monkeypatch.setattr(httpx.Client, "send", send)
    monkeypatch.setattr(httpx.AsyncClient, "send", asend)

    insecure, secure = grpc.insecure_channel, grpc.secure_channel

    def insecure_channel(*args: Any, **kwargs: Any) -> grpc.Channel:
        return grpc.intercept_channel(insecure(*args, **kwargs), _ErrorObserver())

    def secure_channel(*args: Any, **kwargs: Any) -> grpc.Channel:
        return grpc.intercept_channel(secure(*args, **kwargs), _ErrorObserver())

    monkeypatch.setattr(grpc, "insecure_channel", insecure_channel)
    monkeypatch.setattr(grpc, "secure_channel", secure_channel)


def _key_secrets(base: Path) -> set[bytes]:
    """What each private-key file the run created would look like if leaked."""
    found: set[bytes] = set()
    for path in base.rglob("*.key"):
        try:
            if not path.is_file() or path.is_symlink() or path.stat().st_size > _KEY_FILE_LIMIT:
                continue
            data = path.read_bytes().strip()
        except OSError:
            continue
        lines = [line.strip() for line in data.splitlines() if not line.startswith(b"-----")]
        longest = max(lines, key=len, default=b"")
        if len(longest) >= _MIN_SECRET:
            found.add(longest)
    return found


def _outputs(base: Path) -> Iterator[tuple[Path, bytes]]:
    for path in base.rglob("*"):
        if path.suffix not in _SCANNED or not path.is_file() or path.is_symlink():
            continue
        try:
            if path.stat().st_size > _SCAN_LIMIT:
                continue
            yield path, path.read_bytes()
        except OSError:
            continue


def scan(base: Path) -> list[str]:
    """Every leak found under ``base``, one line each (empty: none)."""
    keys = _key_secrets(base)
    found: list[str] = []
    for path, data in _outputs(base):
        if _API_TOKEN.search(data):
            found.append(f"{path}: an API token")
        if path.suffix not in {".db", ".sqlite"} and _PRIVATE_KEY.search(data):
            found.append(f"{path}: a private key")
        if path.suffix in _TEXT_OUTPUTS and any(key in data for key in keys):
            found.append(f"{path}: the content of a private-key file")
    return found
