"""Issue 16, faults under load: ``kill -9`` of ``fedvault gateway start`` mid-load.

Several client threads drive steady load over REST (small bodies, and large
ones that go through the codec worker processes), gRPC unary and a gRPC
stream; each answer that was acknowledged (HTTP 2xx, gRPC OK, a stream answer
without error) has its request id recorded (the ``x-request-id`` header or
trailer, the stream message's own id). The gateway is then
killed outright, its writer and codec worker processes must go with it, and a
gateway restarted on the same home must be ready (its start-up check passed),
hold every acknowledged request in its audit log, and pass ``audit verify``.

Everything is real: the CLI gateway as a subprocess, its SQLite audit log,
``audit verify`` as a subprocess over HTTP.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from secure.signed_note import load_note_signer
from server.audit.log import AuditLog
from server.audit.records import decode_entry
from server.audit.storage import open_storage
from server.gateway.pb import grpc_service_pb2 as pb
from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc
from tests.cli_support import GatewayProcess as Gateway
from tests.cli_support import create_keys, gateway_process, run_cli, write_token_file
from tests.gateway_support import MODEL, make_home

pytestmark = pytest.mark.slow

LOAD_BEFORE_KILL_S = 3.0  # steady load, then kill -9 while it goes on
LOAD_AFTER_KILL_S = 0.5  # the clients keep calling a dead gateway (refused: not acknowledged)
SMALL = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [1] * 30}]}
LARGE_ROWS = 1000  # ~270 kB of JSON: past the codec's offload size, decoded in a worker
LARGE = {
    "inputs": [
        {
            "name": "features",
            "shape": [LARGE_ROWS, 30],
            "datatype": "FP32",
            "data": [0.1234567] * (LARGE_ROWS * 30),
        }
    ]
}


@contextmanager
def _gateway(home: Path, log_file: Path) -> Iterator[Gateway]:
    """The CLI gateway in its own session; anything of that session left is killed."""
    sid = None
    try:
        with gateway_process(home, log_file, "--rate-limit", "0") as gw:  # no 429s under load
            sid = gw.proc.pid
            yield gw
    finally:
        for pid in _session(sid) if sid is not None else []:  # never leave anything behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a live, non-zombie process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[3])


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the gateway's, started with a new session)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != sid:
            stat = _stat(int(entry))
            if stat is not None and stat[1] == sid:
                found.append(int(entry))
    return found


def _left_in(sid: int, timeout: float = 15) -> list[str]:
    """Processes of session ``sid`` still running after ``timeout`` s (their command lines).

    Waited for: a codec worker sees its parent gone within a second, the
    resource tracker when the last of them closes its pipe.
    """
    deadline = time.monotonic() + timeout
    while (left := _session(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"{p}: {_cmdline(p)}" for p in left]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "(gone)"


def _children(pid: int) -> list[int]:
    return [p for p in _session(pid) if (s := _stat(p)) is not None and s[0] == pid]


@dataclass
class Load:
    """What the client threads saw: acknowledged request ids, and everything else."""

    acked: dict[str, set[str]] = field(default_factory=dict)  # kind → request ids
    failed: dict[str, int] = field(default_factory=dict)  # kind → calls not acknowledged
    errors: list[str] = field(default_factory=list)  # a client thread's own failure
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, kind: str, rid: str) -> None:
        with self.lock:
            if rid in self.acked.setdefault(kind, set()):
                self.errors.append(f"request id {rid} acknowledged twice")
            self.acked[kind].add(rid)

    def fail(self, kind: str) -> None:
        with self.lock:
            self.failed[kind] = self.failed.get(kind, 0) + 1

    def all_ids(self) -> set[str]:
        return set().union(*self.acked.values())


def _rest_client(url: str, token: str, body: dict[str, object], kind: str) -> Callable[..., None]:
    def run(load: Load, stop: threading.Event) -> None:
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{url}/v2/models/{MODEL}/infer", json=body, headers=auth)
                except httpx.HTTPError:
                    load.fail(kind)
                    time.sleep(0.01)  # the gateway is gone: do not spin
                    continue
                if 200 <= r.status_code < 300:
                    load.ack(kind, r.headers["x-request-id"])
                else:
                    load.fail(kind)

    return run


def _grpc_client(target: str, token: str) -> Callable[..., None]:
    def run(load: Load, stop: threading.Event) -> None:
        req = pb.ModelInferRequest(model_name=MODEL)  # no id: the gateway makes one
        t = req.inputs.add(name="features", datatype="FP32", shape=[1, 30])
        t.contents.fp32_contents.extend([1.0] * 30)
        md = (("authorization", f"Bearer {token}"),)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    _, call = stub.ModelInfer.with_call(req, metadata=md, timeout=10)
                except grpc.RpcError:
                    load.fail("grpc")
                    time.sleep(0.01)
                    continue
                load.ack("grpc", dict(call.trailing_metadata() or ())["x-request-id"])

    return run


def _stream_client(target: str, token: str) -> Callable[..., None]:
    """One ModelStreamInfer stream, one message at a time, re-opened when it breaks.

    A message is acknowledged when its answer arrives without an error: the
    gateway sends it only after the message's own audit record is durable.
    """

    def run(load: Load, stop: threading.Event) -> None:
        md = (("authorization", f"Bearer {token}"),)
        ids = itertools.count()
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
                answers = stub.ModelStreamInfer(iter(requests.get, None), metadata=md, timeout=30)
                try:
                    while not stop.is_set():
                        rid = f"stream-{next(ids)}"
                        req = pb.ModelInferRequest(model_name=MODEL, id=rid)
                        t = req.inputs.add(name="features", datatype="FP32", shape=[1, 30])
                        t.contents.fp32_contents.extend([1.0] * 30)
                        requests.put(req)
                        answer = next(answers)
                        if answer.error_message:
                            load.fail("grpc-stream")
                        else:
                            load.ack("grpc-stream", answer.infer_response.id)
                except (grpc.RpcError, StopIteration):
                    load.fail("grpc-stream")
                    time.sleep(0.01)  # the gateway is gone: do not spin
                finally:
                    requests.put(None)
                    answers.cancel()

    return run


def _audited(home: Path) -> dict[str, tuple[str, str | None]]:
    """request id → (action, status) of every entry in the audit log."""
    log = AuditLog(
        open_storage(str(home / "audit.db")), load_note_signer(home / "keys" / "gateway-audit.key")
    )
    records = []
    try:
        size = log.size()
        while len(records) < size:  # page by page: entries() returns at most MAX_PAGE
            records += [decode_entry(e) for _, e in log.entries(len(records), size)]
    finally:
        log.close()
    return {r.request_id: (r.action, r.status) for r in records if r.request_id is not None}


def test_kill_9_under_load_loses_no_acknowledged_request(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home)
    tokens = create_keys(home, MODEL)
    token_file = write_token_file(tmp_path / "auditor.token", tokens["auditor"])

    load, stop = Load(), threading.Event()
    with _gateway(home, tmp_path / "first.log") as gw:
        pid = gw.proc.pid
        clients = [
            *(_rest_client(gw.url, tokens["analyst"], SMALL, "rest") for _ in range(3)),
            _rest_client(gw.url, tokens["analyst"], LARGE, "rest-large"),
            *(_grpc_client(gw.grpc_target, tokens["analyst"]) for _ in range(2)),
            _stream_client(gw.grpc_target, tokens["analyst"]),
        ]

        def client(run: Callable[..., None]) -> None:
            try:
                run(load, stop)
            except Exception as exc:  # seen by the test, not lost with the thread
                with load.lock:
                    load.errors.append(repr(exc))

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        try:
            time.sleep(LOAD_BEFORE_KILL_S)
            # Its helpers (audit writer, codec workers) are running: they must go with it.
            helpers = _children(pid)
            assert helpers, "the gateway started no helper process"
            with load.lock:
                before = {k: len(v) for k, v in load.acked.items()}
            assert all(
                before.get(k, 0) > 0 for k in ("rest", "rest-large", "grpc", "grpc-stream")
            ), before
            os.kill(pid, signal.SIGKILL)
            assert gw.proc.wait(10) == -signal.SIGKILL
            time.sleep(LOAD_AFTER_KILL_S)
        finally:
            stop.set()
            for t in threads:
                t.join(15)
        assert not any(t.is_alive() for t in threads)
        assert not load.errors, load.errors
        left = _left_in(pid)  # the writer, the codec workers, anything else it started
        assert not left, f"helpers of the killed gateway still running: {left}"
        assert all(_stat(p) is None for p in helpers)

    acked = load.all_ids()
    assert sum(load.failed.values()) > 0  # the kill was felt by the clients, mid-load

    log_file = tmp_path / "restarted.log"
    with _gateway(home, log_file) as gw:
        ready = httpx.get(f"{gw.url}/v2/health/ready")
        assert ready.status_code == 200, ready.text  # the start-up check found the log intact
        auth = {"Authorization": f"Bearer {tokens['analyst']}"}
        after = httpx.post(f"{gw.url}/v2/models/{MODEL}/infer", json=SMALL, headers=auth)
        assert after.status_code == 200, after.text
        acked.add(after.headers["x-request-id"])
        key = run_cli("audit", "public-key", "--home", home).stdout.strip()
        verified = run_cli(
            "audit", "verify", "--url", gw.url, "--key", key, "--token-file", token_file
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(20) == 0, log_file.read_text()
        left = _left_in(gw.proc.pid)
        assert not left, f"a clean stop left processes running: {left}"

    audited = _audited(home)
    missing = acked - audited.keys()
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged requests not audited"
    for rid in acked:
        assert audited[rid] in (
            ("rest:infer", "200"),
            ("grpc:ModelInfer", "OK"),
            ("grpc:ModelStreamInfer", "OK"),
        ), audited[rid]
    counts = {k: len(v) for k, v in load.acked.items()}
    print(  # for the record: -s shows what one run drove
        f"acknowledged {counts}, not acknowledged {load.failed}, audited {len(audited)}"
    )
