"""Gateway throughput and latency: auth + audit on vs off, bare FastAPI, MLServer (JSON, one run).

Plaintext inference of one row (breast-cancer logistic regression, 30 FP32
features) by concurrent clients on loopback, every server driven by the same
load generator:

- ``rest_audited`` / ``grpc_audited``: ``fedvault gateway start``'s stack —
  API key checked (cached scrypt verdict), role + grant, rate limiter, audit
  record appended durably (SQLite WAL, FULL sync, group commit in the writer
  process) before the answer;
- ``rest_audited_thread`` / ``grpc_audited_thread`` (``--thread-writer``): the
  same with the in-process writer thread (``--audit-writer thread``);
- ``rest_unaudited`` / ``grpc_unaudited``: the same server and service with
  authentication and audit off (``unaudited_for_benchmark``);
- ``rest_bare_fastapi``: a one-route FastAPI app returning the same
  prediction (the floor a FastAPI server can reach here);
- ``rest_mlserver``: MLServer + mlserver-sklearn serving the same model from
  a joblib file, from ``/tmp/mlserver-venv`` (kept out of our venv); skipped
  with a reason if that venv is missing.

Load generator: ``h2load`` (nghttp2, C; Debian ``nghttp2-client``) when it is
found — ``--h2load PATH``, ``$H2LOAD`` or PATH — for every server alike:
HTTP/1.1 keep-alive for REST, HTTP/2 with a framed protobuf body for gRPC, one
request in flight per connection, pre-built bodies, 1 s warm-up. It costs the
shared CPUs far less than a Python client, which mattered most for gRPC (the
grpc.aio client ate the CPU the server needed). Successes are checked: REST
counts non-2xx as failures; gRPC errors arrive as HTTP 200 with a
``grpc-status`` trailer and no message, so each gRPC server first answers one
call from a real gRPC client (status OK) and ``responses_without_message``
counts answers whose message bytes are missing; the audited runs also tally
the audit log's entries by status. Without h2load (or with ``--loadgen
python``) the previous generators run: a minimal asyncio HTTP/1.1 client and
grpc.aio. Each result also carries the server's CPU time per request (the
process and its children, i.e. the audit writer too), which noisy neighbours
disturb far less than throughput, and the setup records fsync latency and
load average before and after. Each server runs in its own process. Usage:
``python bench/gateway.py [--seconds 5] [--connections 16] [--thread-writer]``.
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = "bc-logreg"
MLSERVER_VENV = Path("/tmp/mlserver-venv")  # noqa: S108 - kept out of our venv on purpose


# ------------------------------------------------------------------- fixtures
def _train() -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:  # type: ignore[type-arg]
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fedvault.datasets import load_builtin

    x, y, _ = load_builtin("breast-cancer")
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    return pipe, x.astype(np.float32), pipe[0].mean_, pipe[0].scale_


def prepare(home: Path) -> tuple[np.ndarray, Any]:  # type: ignore[type-arg]
    """Register the model (sealed) and write the same pipeline as a joblib file."""
    import joblib

    from fedvault.modelspec import ModelSpec
    from fedvault.stats import Scaler
    from server.gateway.keys import GatewayStore
    from server.registry import ModelRegistry, ensure_model_keys, load_model_keys
    from server.store import FederationStore

    pipe, x, mean, scale = _train()
    lr = pipe[1]
    d = x.shape[1]
    # Binary LR as a 2-logit softmax: logits [0, w.x + b] give the same argmax and p.
    w = np.vstack([np.zeros(d), lr.coef_[0]]).astype(np.float32)
    b = np.array([0.0, lr.intercept_[0]], dtype=np.float32)
    ensure_model_keys(home / "keys")
    store = FederationStore(home / "federation.db")
    store.create_run("bench", {}, {})
    ModelRegistry(store, home / "registry", load_model_keys(home / "keys")).register(
        name=MODEL,
        run_id="bench",
        spec=ModelSpec(kind="logreg", n_features=d, n_classes=2),
        params=[w, b],
        scaler=Scaler(mean=mean, std=scale),
        lineage={"run_id": "bench", "dataset": "breast-cancer", "private": False},
    )
    store.close()
    keys = GatewayStore(home / "gateway.db")
    token, _ = keys.create_key("analyst", models=frozenset({MODEL}))
    keys.close()
    (home / "token").write_text(token)
    mdir = home / "mlserver" / MODEL
    mdir.mkdir(parents=True)
    joblib.dump(pipe, mdir / "model.joblib")
    (mdir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": MODEL,
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "1"},
            }
        )
    )
    (home / "mlserver" / "settings.json").write_text(
        json.dumps({"debug": False, "metrics_endpoint": None, "parallel_workers": 0})
    )
    return x, pipe


# -------------------------------------------------------------------- servers
def serve(home: Path, mode: str, http_port: int, grpc_port: int) -> None:
    """Child process: one server until killed."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    if mode == "bare":
        import uvicorn
        from fastapi import FastAPI, Request

        from server.registry import ModelRegistry, load_model_keys
        from server.store import FederationStore

        store = FederationStore(home / "federation.db")
        (row,) = store.models()
        loaded = ModelRegistry(store, home / "registry", load_model_keys(home / "keys")).load(
            row["model_id"]
        )
        mean, inv = (
            loaded.scaler.mean.astype(np.float32),
            (1 / loaded.scaler.std).astype(np.float32),
        )
        w, b = loaded.params
        app = FastAPI()

        @app.post("/predict")
        async def predict(request: Request) -> dict[str, Any]:
            doc = await request.json()
            x = np.asarray(doc["inputs"][0]["data"], dtype=np.float32).reshape(-1, w.shape[1])
            logits = ((x - mean) * inv) @ w.T + b
            return {"outputs": [{"name": "logits", "data": logits.ravel().tolist()}]}

        uvicorn.run(app, host="127.0.0.1", port=http_port, log_level="warning", access_log=False)
        return
    from fedvault.cli.gateway import audit_committer
    from secure.signed_note import generate_note_key
    from server.audit.log import AuditLog
    from server.audit.storage import open_storage
    from server.gateway.build import GatewayConfig, build_gateway
    from server.gateway.runner import Listen
    from server.gateway.runner import run as run_gateway
    from server.registry import load_model_keys

    # What `fedvault gateway start` does: a writer process unless told "thread".
    location = str(home / f"audit-{mode}.db")
    writer = "thread" if mode == "audited_thread" else "process"
    log = AuditLog(
        open_storage(location),
        generate_note_key("bench/gateway-audit"),
        committer=audit_committer(writer, location, None),
    )
    gw = build_gateway(
        GatewayConfig(
            federation_db=home / "federation.db",
            registry_dir=home / "registry",
            model_keys=load_model_keys(home / "keys", signing=False),
            gateway_db=home / "gateway.db",
            rate_limit_per_s=0.0,
            enable_he=False,
        ),
        log,
    )
    run_gateway(
        gw,
        Listen("127.0.0.1", http_port, grpc_port),
        unaudited_for_benchmark=mode == "unaudited",
    )
    batches, items = log.group_commit_stats
    (home / f"commits-{mode}.json").write_text(json.dumps({"batches": batches, "items": items}))
    log.close()


# -------------------------------------------------------------- load generator
def _http_request(path: str, body: bytes, token: str | None) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if token:
        head.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _rest_worker(
    port: int, request: bytes, stop_at: float, lat: list[float], codes: dict[int, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            codes[status] = codes.get(status, 0) + 1
    finally:
        writer.close()


async def _grpc_worker(stub: Any, request: Any, md: Any, stop_at: float, lat: list[float]) -> None:
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        await stub.ModelInfer(request, metadata=md)
        lat.append(time.perf_counter() - t0)


def _summary(lat: list[float], seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    lat_ms = sorted(v * 1000 for v in lat)
    n = len(lat_ms)
    return {
        "requests": n,
        "throughput_rps": round(n / seconds, 1),
        "p50_ms": round(statistics.median(lat_ms), 3) if n else None,
        "p99_ms": round(lat_ms[min(n - 1, int(0.99 * n))], 3) if n else None,
        **extra,
    }


async def load_rest(
    port: int, path: str, body: bytes, token: str | None, conns: int, seconds: float
) -> dict[str, Any]:
    request = _http_request(path, body, token)
    warm: list[float] = []
    await asyncio.gather(
        *[_rest_worker(port, request, time.perf_counter() + 1.0, warm, {}) for _ in range(conns)]
    )
    lat: list[float] = []
    codes: dict[int, int] = {}
    start = time.perf_counter()
    await asyncio.gather(
        *[_rest_worker(port, request, start + seconds, lat, codes) for _ in range(conns)]
    )
    return _summary(lat, time.perf_counter() - start, {"status_codes": codes})


async def load_grpc(
    port: int,
    x: np.ndarray,
    token: str,
    conns: int,
    seconds: float,  # type: ignore[type-arg]
) -> dict[str, Any]:
    import grpc

    from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc

    req = _grpc_request(x)
    md = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        warm: list[float] = []
        await asyncio.gather(
            *[_grpc_worker(stub, req, md, time.perf_counter() + 1.0, warm) for _ in range(conns)]
        )
        lat: list[float] = []
        start = time.perf_counter()
        await asyncio.gather(
            *[_grpc_worker(stub, req, md, start + seconds, lat) for _ in range(conns)]
        )
    return _summary(lat, time.perf_counter() - start, {})


# ------------------------------------------------------------- h2load driver
def find_h2load(explicit: str | None) -> str | None:
    """``--h2load``, ``$H2LOAD``, then PATH (Debian: ``apt-get install nghttp2-client``)."""
    for candidate in (explicit, os.environ.get("H2LOAD"), shutil.which("h2load")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _h2load(
    h2load: str,
    url: str,
    body: bytes,
    headers: list[str],
    *,
    h1: bool,
    conns: int,
    seconds: float,
    work: Path,
) -> dict[str, Any]:
    """One h2load run: 1 s warm-up, then ``seconds`` measured; counts and latency percentiles."""
    import re

    body_file, log_file = work / "body.bin", work / "h2load.log"
    body_file.write_bytes(body)
    log_file.unlink(missing_ok=True)
    duration = f"{max(1, round(seconds * 1000))}ms"  # h2load takes integers with units
    cmd = [h2load, "-c", str(conns), "-m", "1", "-D", duration, "--warm-up-time", "1"]
    cmd += ["--h1"] if h1 else []
    for header in headers:
        cmd += ["-H", header]
    cmd += ["-d", str(body_file), "--log-file", str(log_file), url]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = run.stdout
    if "requests:" not in out:
        raise RuntimeError(f"h2load failed: {(run.stderr or out)[-500:]}")

    def grab(pattern: str) -> list[int]:
        found = re.search(pattern, out)
        return [int(v) for v in found.groups()] if found else []

    done, ok, failed, errored, timeout = grab(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout"
    ) or [0, 0, 0, 0, 0]
    s2xx, s3xx, s4xx, s5xx = grab(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx") or [
        0,
        0,
        0,
        0,
    ]
    (data,) = grab(r"traffic: .*? \((\d+)\) data") or [0]
    lat = []
    if log_file.exists():
        for line in log_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].startswith("2"):
                lat.append(int(parts[2]) / 1e6)
    return _summary(
        lat[: s2xx or len(lat)],
        seconds,
        {
            "status_codes": {"2xx": s2xx, "3xx": s3xx, "4xx": s4xx, "5xx": s5xx},
            "failed": failed + errored + timeout,
            "data_bytes": data,
            "done": done,
            "succeeded": ok,
        },
    )


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (the audit writer too)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def fsync_ms(directory: Path, n: int = 50) -> float:
    """Median latency of a small write + fsync in ``directory``: what a durable commit waits on."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    times = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 512)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return round(statistics.median(times) * 1000, 3)


def audit_tally(db: Path) -> dict[str, Any]:
    """Entries and their status codes in a finished run's audit log (errors would show here)."""
    import sqlite3

    from server.audit.records import decode_entry

    conn = sqlite3.connect(db)
    try:
        statuses: dict[str, int] = {}
        for (entry,) in conn.execute("SELECT entry FROM audit_entries"):
            status = decode_entry(bytes(entry)).status or "-"
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        conn.close()
    return {"entries": sum(statuses.values()), "by_status": statuses}


def grpc_preflight(port: int, x: np.ndarray, token: str) -> int:  # type: ignore[type-arg]
    """One ModelInfer through a real gRPC client: raises unless OK; the framed response size."""
    import grpc

    from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.ModelInfer(
            _grpc_request(x), metadata=(("authorization", f"Bearer {token}"),), timeout=30
        )
    return 5 + len(reply.SerializeToString())


def _grpc_request(x: np.ndarray) -> Any:  # type: ignore[type-arg]
    from server.gateway.pb import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


# ------------------------------------------------------------------- harness
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(port: int, path: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on {port} did not come up")


def _start(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    return subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def _stop(proc: Any) -> None:
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--h2load", help="h2load binary (default: $H2LOAD, then PATH)")
    parser.add_argument(
        "--loadgen",
        choices=("auto", "h2load", "python"),
        default="auto",
        help="auto: h2load when found, else the Python clients",
    )
    parser.add_argument(
        "--thread-writer",
        action="store_true",
        help="also measure the audited gateway with the in-process writer thread",
    )
    parser.add_argument("--serve", nargs=4, metavar=("HOME", "MODE", "HTTP", "GRPC"))
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), args.serve[1], int(args.serve[2]), int(args.serve[3]))
        return
    h2load = None if args.loadgen == "python" else find_h2load(args.h2load)
    if args.loadgen == "h2load" and h2load is None:
        parser.error("h2load not found (Debian: apt-get install nghttp2-client)")
    home = Path(tempfile.mkdtemp(prefix="fedvault-bench-gw-"))
    fsync_before = fsync_ms(home)
    load_before = os.getloadavg()
    x_all, _pipe = prepare(home)
    x = x_all[:1]
    token = (home / "token").read_text()
    oip = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [1, 30],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()
    mlserver_body = json.dumps(
        {
            "inputs": [
                {
                    "name": "predict",
                    "shape": [1, 30],
                    "datatype": "FP64",
                    "data": x.astype(np.float64).ravel().tolist(),
                }
            ]
        }
    ).encode()
    grpc_body = _grpc_request(x).SerializeToString()
    grpc_framed = b"\0" + len(grpc_body).to_bytes(4, "big") + grpc_body
    results: dict[str, Any] = {}
    conns, secs = args.connections, args.seconds

    def drive_rest(port: int, path: str, body: bytes, auth: str | None) -> dict[str, Any]:
        if h2load is None:
            return asyncio.run(load_rest(port, path, body, auth, conns, secs))
        headers = ["content-type: application/json"]
        headers += [f"authorization: Bearer {auth}"] if auth else []
        url = f"http://127.0.0.1:{port}{path}"
        return _h2load(h2load, url, body, headers, h1=True, conns=conns, seconds=secs, work=home)

    def drive_grpc(port: int) -> dict[str, Any]:
        expected = grpc_preflight(port, x, token)  # a real client first: status OK
        if h2load is None:
            return asyncio.run(load_grpc(port, x, token, conns, secs))
        url = f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"
        headers = [
            "content-type: application/grpc",
            "te: trailers",
            f"authorization: Bearer {token}",
        ]
        out = _h2load(
            h2load, url, grpc_framed, headers, h1=False, conns=conns, seconds=secs, work=home
        )
        # gRPC errors are HTTP 200 with a grpc-status trailer and no message:
        # answers without a full response message show up as missing data bytes.
        out["responses_without_message"] = max(0, out["done"] - out["data_bytes"] // expected)
        return out

    def measured(pid: int, run: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        """``run(*args)`` plus the server's CPU per request (readable despite noisy neighbours)."""
        cpu0 = _tree_cpu_s(pid)
        out = run(*args)
        served = out["requests"]
        out["server_cpu_us_per_request"] = (
            round((_tree_cpu_s(pid) - cpu0) / served * 1e6, 1) if served else None
        )
        return out

    modes = ["audited", "unaudited"] + (["audited_thread"] if args.thread_writer else [])
    for mode in modes:
        http_port, grpc_port = _free_port(), _free_port()
        proc = _start(
            [sys.executable, __file__, "--serve", str(home), mode, str(http_port), str(grpc_port)]
        )
        try:
            _wait_http(http_port, "/v2/health/live")
            path = f"/v2/models/{MODEL}/infer"
            results[f"rest_{mode}"] = measured(proc.pid, drive_rest, http_port, path, oip, token)
            results[f"grpc_{mode}"] = measured(proc.pid, drive_grpc, grpc_port)
        finally:
            _stop(proc)
        if mode != "unaudited":
            results[f"audit_log_{mode}"] = audit_tally(home / f"audit-{mode}.db")
            commits = home / f"commits-{mode}.json"
            if commits.exists():  # the server wrote its group-commit counts on the way out
                counts = json.loads(commits.read_text())
                results[f"audit_log_{mode}"]["mean_batch"] = round(
                    counts["items"] / max(counts["batches"], 1), 2
                )

    port = _free_port()
    proc = _start([sys.executable, __file__, "--serve", str(home), "bare", str(port), "0"])
    try:
        _wait_http(port, "/docs")
        results["rest_bare_fastapi"] = measured(proc.pid, drive_rest, port, "/predict", oip, None)
    finally:
        _stop(proc)

    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    if mlserver.exists():
        port, gport, mport = _free_port(), _free_port(), _free_port()
        env = {
            "MLSERVER_HTTP_PORT": str(port),
            "MLSERVER_GRPC_PORT": str(gport),
            "MLSERVER_METRICS_PORT": str(mport),
            "MLSERVER_PARALLEL_WORKERS": "0",
        }
        proc = _start([str(mlserver), "start", str(home / "mlserver")], env=env)
        try:
            _wait_http(port, f"/v2/models/{MODEL}/ready", timeout=120)
            path = f"/v2/models/{MODEL}/infer"
            results["rest_mlserver"] = measured(
                proc.pid, drive_rest, port, path, mlserver_body, None
            )
            version = subprocess.run(
                [
                    str(MLSERVER_VENV / "bin" / "python"),
                    "-c",
                    "import mlserver; print(mlserver.__version__)",
                ],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            results["rest_mlserver"]["version"] = version
        except RuntimeError as exc:
            err = proc.stderr.read(4000).decode(errors="replace") if proc.poll() is not None else ""
            results["rest_mlserver"] = {"skipped": f"{exc}; {err[-500:]}"}
        finally:
            _stop(proc)
    else:
        results["rest_mlserver"] = {"skipped": f"no MLServer venv at {MLSERVER_VENV}"}

    def ratio(a: str, b: str) -> float | None:
        ra = results.get(a, {}).get("throughput_rps")
        rb = results.get(b, {}).get("throughput_rps")
        return round(ra / rb, 3) if ra and rb else None

    ov_rest = ratio("rest_audited", "rest_unaudited")
    ov_grpc = ratio("grpc_audited", "grpc_unaudited")
    results["comparisons"] = {
        "rest_audited_vs_mlserver": ratio("rest_audited", "rest_mlserver"),
        "rest_auth_audit_overhead": round(1 - ov_rest, 3) if ov_rest else None,
        "grpc_auth_audit_overhead": round(1 - ov_grpc, 3) if ov_grpc else None,
        "grpc_vs_rest_audited": ratio("grpc_audited", "rest_audited"),
        "rest_unaudited_vs_bare_fastapi": ratio("rest_unaudited", "rest_bare_fastapi"),
        "targets": {
            "rest_audited_vs_mlserver": ">= 1.0",
            "auth_audit_overhead": "<= 0.15",
            "grpc_vs_rest": ">= 1.5",
        },
    }
    results["setup"] = {
        "connections": conns,
        "seconds": secs,
        "batch": 1,
        **machine_setup(h2load, home, fsync_before, load_before),
    }
    print(json.dumps(results, indent=2))
    shutil.rmtree(home, ignore_errors=True)


def machine_setup(
    h2load: str | None, home: Path, fsync_before: float, load_before: tuple[float, float, float]
) -> dict[str, Any]:
    """What the figures depend on besides the servers: CPUs, load generator, disk, load."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_generator": f"h2load ({h2load})" if h2load else "python (asyncio HTTP/1.1, grpc.aio)",
        "fsync_ms_median": {"before": fsync_before, "after": fsync_ms(home)},
        "loadavg_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "note": "servers and load generator share this machine's CPUs",
    }


if __name__ == "__main__":
    main()
