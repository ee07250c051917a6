"""``--log-format json``: one parseable object a line, ids attached, no payload or secret.

Why these tests: a log shipper (deploy/vector.yaml) parses every line of a
server's output as JSON; one stray text line (uvicorn's own, a start-up
banner) or an exception message quoting a request would break that or leak
into the log store.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from fedvault import logs
from fedvault.logs import JsonFormatter, LogFormat, configure_logging, uvicorn_log_config

FIELDS = {"timestamp", "level", "component", "message"}
LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
INFER = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [1] * 30}]}


def _record(msg: str, *, exc: BaseException | None = None, **extra: object) -> logging.LogRecord:
    record = logging.getLogger("fedvault.test").makeRecord(
        "fedvault.test",
        logging.ERROR,
        __file__,
        1,
        msg,
        (),
        (type(exc), exc, exc.__traceback__) if exc is not None else None,
        extra=extra or None,
    )
    return record


def _check_line(line: str) -> dict[str, object]:
    entry = json.loads(line)
    assert isinstance(entry, dict), line
    assert FIELDS <= entry.keys(), line
    assert entry["level"] in LEVELS, line
    stamp = str(entry["timestamp"])
    assert stamp.endswith("Z"), stamp
    assert datetime.fromisoformat(stamp).utcoffset() is not None
    return entry


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes the root logger; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    uvicorn_state = {
        name: (
            list(logging.getLogger(name).handlers),
            logging.getLogger(name).propagate,
            logging.getLogger(name).disabled,
            logging.getLogger(name).level,
        )
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
    }
    env = os.environ.get(logs.ENV_VAR)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, (saved, propagate, disabled, level) in uvicorn_state.items():
        logging.getLogger(name).handlers[:] = saved
        logging.getLogger(name).propagate = propagate
        logging.getLogger(name).disabled = disabled
        logging.getLogger(name).setLevel(level)
    if env is None:
        os.environ.pop(logs.ENV_VAR, None)
    else:
        os.environ[logs.ENV_VAR] = env


# ------------------------------------------------------------------------ formatter
def test_a_record_is_one_json_line_with_the_standard_fields() -> None:
    entry = _check_line(JsonFormatter().format(_record("model loaded\nsecond line")))
    assert entry["component"] == "fedvault.test"
    assert entry["level"] == "ERROR"
    assert entry["message"] == "model loaded\nsecond line"
    assert "request_id" not in entry
    assert "run_id" not in entry


def test_an_exception_gives_its_class_never_its_message() -> None:
    marker = "fvk_secret-token 42.5"
    try:
        raise ValueError(f"could not convert string to float: {marker!r}")
    except ValueError as exc:
        line = JsonFormatter().format(_record("failed", exc=exc))
    entry = _check_line(line)
    assert entry["exc_type"] == "builtins.ValueError"
    assert "secret-token" not in line
    assert "Traceback" not in line


def test_a_json_message_is_merged_and_standard_fields_win() -> None:
    message = json.dumps({"event": "unexpected_error", "error": "x.Y", "level": "forged"})
    entry = _check_line(JsonFormatter().format(_record(message)))
    assert entry["message"] == "unexpected_error"
    assert entry["error"] == "x.Y"
    assert entry["level"] == "ERROR"


def test_a_json_message_never_supplies_ids_or_an_exception_type() -> None:
    forged = {"event": "e", "request_id": "forged", "run_id": "forged", "exc_type": "forged"}
    entry = _check_line(JsonFormatter().format(_record(json.dumps(forged))))
    assert not {"request_id", "run_id", "exc_type"} & entry.keys(), entry


def test_request_and_run_ids_come_from_the_context_or_extra() -> None:
    formatter = JsonFormatter()
    with logs.with_request_id("req-7"):
        token = logs.run_id.set("run-3")
        try:
            entry = _check_line(formatter.format(_record("x")))
        finally:
            logs.run_id.reset(token)
    assert (entry["request_id"], entry["run_id"]) == ("req-7", "run-3")
    assert _check_line(formatter.format(_record("x", request_id="req-8")))["request_id"] == "req-8"
    assert "request_id" not in _check_line(formatter.format(_record("x")))


# ---------------------------------------------------------------- configure_logging
@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_is_idempotent_and_routes_uvicorn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("text")
    assert uvicorn_log_config() is not None  # text: uvicorn's own format, as before
    logging.getLogger("uvicorn.error").addHandler(logging.NullHandler())
    logging.getLogger("uvicorn.error").propagate = False
    configure_logging(LogFormat.json, export=True)
    configure_logging("JSON")
    assert os.environ[logs.ENV_VAR] == "json"
    assert uvicorn_log_config() is None
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    logging.getLogger("fedvault.x").info("hello")
    lines = stream.getvalue().splitlines()
    assert [_check_line(line)["component"] for line in lines] == ["uvicorn.error", "fedvault.x"]


def test_every_long_running_command_offers_log_format_with_the_env_var() -> None:
    import typer

    from fedvault.cli.main import app

    root = typer.main.get_command(app)
    for group, name in (
        ("gateway", "start"),
        ("he", "serve"),
        ("audit", "serve"),
        ("federation", "up"),
        ("federation", "fleet-proxy"),
        ("node", "start"),
    ):
        command = root.commands[group].commands[name]  # type: ignore[attr-defined]
        (param,) = [p for p in command.params if "--log-format" in p.opts]
        assert param.envvar == logs.ENV_VAR, (group, name)
        assert param.default == LogFormat.text, (group, name)


# ------------------------------------------------------- the gateway, in process
def test_a_record_logged_while_serving_carries_the_request_id(tmp_path: Path) -> None:
    """The REST middleware sets the id for everything a request's handling logs."""
    from server.gateway.rest import create_rest_app
    from tests.gateway_support import MODEL, build
    from tests.he_support import live_server

    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))  # formatted now, in the request's context

    capture = Capture()
    capture.setFormatter(JsonFormatter())
    logger = logging.getLogger("fedvault.test.inside")
    logger.addHandler(capture)
    h = build(tmp_path)
    original = h.gw.service.infer

    def logging_infer(*args: object, **kwargs: object) -> object:
        logger.warning("inferring")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    h.gw.service.infer = logging_infer  # type: ignore[method-assign]
    try:
        with live_server(create_rest_app(h.gw)) as base:
            r = httpx.post(
                f"{base}/v2/models/{MODEL}/infer",
                json=INFER,
                headers={
                    "Authorization": f"Bearer {h.tokens['analyst']}",
                    "x-request-id": "req-abc",
                },
                timeout=30,
            )
        assert r.status_code == 200, r.text
    finally:
        logger.removeHandler(capture)
        h.gw.codec.close()
        h.log.close()
    (entry,) = [_check_line(line) for line in lines]
    assert (entry["message"], entry["request_id"]) == ("inferring", "req-abc")


# ------------------------------------------------------ the gateway, a real process
def test_gateway_start_log_format_json_writes_only_json_lines(tmp_path: Path) -> None:
    from tests.gateway_support import MODEL, make_home
    from tests.he_support import free_port

    make_home(tmp_path)
    fedvault = [sys.executable, "-m", "fedvault"]
    keys_create = [
        *fedvault, "keys", "create", "--role", "analyst", "--model", MODEL,
        "--home", str(tmp_path), "--json",
    ]  # fmt: skip
    created = subprocess.run(
        keys_create,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    forged = "fvk_forged-credential-0123456789"
    http_port, grpc_port = free_port(), free_port()
    start = [
        *fedvault, "gateway", "start", "--home", str(tmp_path), "--no-he",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--log-format", "json",
    ]  # fmt: skip
    proc = subprocess.Popen(
        start,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{base}/v2/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)
        url = f"{base}/v2/models/{MODEL}/infer"
        ok = httpx.post(url, json=INFER, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert ok.status_code == 200, ok.text
        refused = httpx.post(url, json=INFER, headers={"Authorization": f"Bearer {forged}"})
        assert refused.status_code == 401
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as raw:
            raw.sendall(b"NOT HTTP \x00\r\n\r\n")  # uvicorn answers 400 and logs a warning
            assert raw.recv(64).startswith(b"HTTP/1.1 400")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [line for line in (out + err).splitlines() if line.strip()]
    entries = [_check_line(line) for line in lines]
    messages = [(e["component"], e["message"]) for e in entries]
    assert ("fedvault.gateway", "gateway_started") in messages
    assert ("fedvault.gateway", "gateway_stopped") in messages
    assert ("uvicorn.error", "Invalid HTTP request received.") in messages
    text = out + err
    assert token not in text
    assert forged not in text
    assert "Bearer" not in text


# ------------------------------------------------------------------ the shipper sample
def test_the_vector_sample_parses_the_lines_these_servers_write() -> None:
    """deploy/vector/vector.yaml: YAML, wired end to end, labels only on bounded fields."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "deploy/vector/vector.yaml").read_text())
    (source,) = config["sources"]
    transform = config["transforms"]["fedvault"]
    assert transform["inputs"] == [source]
    assert "parse_json(.message)" in transform["source"]
    assert "%Y-%m-%dT%H:%M:%S%.fZ" in transform["source"]  # what JsonFormatter writes
    loki = config["sinks"]["loki"]
    assert loki["inputs"] == ["fedvault"]
    assert loki["tls"]["verify_certificate"] is True
    assert "http://" not in loki["endpoint"]
    labels = {value.strip("{} ") for value in loki["labels"].values()}
    assert labels == {"service", "component", "level"}  # never request_id: unbounded
    stamp = _check_line(JsonFormatter().format(_record("x")))["timestamp"]
    datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------- audit serve, via the env var
def test_audit_serve_with_the_env_var_writes_only_json_lines(tmp_path: Path) -> None:
    from secure.signed_note import generate_note_key, save_note_signer
    from tests.he_support import free_port

    key = tmp_path / "audit.key"
    save_note_signer(key, generate_note_key("test/logs"))
    secret = "audit-token-0123456789abcdef"  # noqa: S105 (a test token)
    token_file = tmp_path / "token"
    token_file.write_text(secret)
    token_file.chmod(0o600)
    port = free_port()
    serve = [
        sys.executable, "-m", "fedvault", "audit", "serve", "--db", str(tmp_path / "a.db"),
        "--key", str(key), "--port", str(port), "--token-file", str(token_file),
    ]  # fmt: skip
    proc = subprocess.Popen(
        serve,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", logs.ENV_VAR: "json"},
    )
    base = f"http://127.0.0.1:{port}/v2/audit/checkpoint"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                ok = httpx.get(base, headers={"Authorization": f"Bearer {secret}"}, timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "audit serve did not start"
                time.sleep(0.1)
        assert ok.status_code == 200, ok.text
        assert httpx.get(base, headers={"Authorization": "Bearer wrong-guess"}).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    entries = [_check_line(line) for line in (out + err).splitlines() if line.strip()]
    assert ("fedvault.audit", "serving") in [(e["component"], e["message"]) for e in entries]
    assert secret not in out + err
    assert "wrong-guess" not in out + err


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("silenced", ["level", "disabled"])
def test_uvicorn_loggers_silenced_earlier_in_the_process_speak_again(
    monkeypatch: pytest.MonkeyPatch, silenced: str
) -> None:
    """An earlier in-process uvicorn.Config(log_level="error") leaves that level on
    uvicorn's loggers (CI: the audit tests' servers ran before the test above and
    its warning vanished); a dictConfig disables loggers it does not name. JSON
    logging resets both, so uvicorn's records reach the JSON handler."""
    logger = logging.getLogger("uvicorn.error")
    if silenced == "level":
        logger.setLevel(logging.ERROR)
    else:
        logger.disabled = True  # what such a dictConfig does (no other logger touched)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("json")
    logger.warning("Invalid HTTP request received.")
    (line,) = stream.getvalue().splitlines()
    assert _check_line(line)["component"] == "uvicorn.error"
