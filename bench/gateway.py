"""Gateway throughput and latency: auth + audit on vs off, bare FastAPI, MLServer (JSON, one run).

Plaintext inference of one row (breast-cancer logistic regression, 30 FP32
features) by concurrent clients on loopback, every server driven by the same
load generator:

- ``rest_audited`` / ``grpc_audited``: ``fedvault gateway start``'s stack —
  API key checked (cached scrypt verdict), role + grant, rate limiter, audit
  record appended durably (SQLite WAL, FULL sync, group commit) before the
  answer;
- ``rest_unaudited`` / ``grpc_unaudited``: the same server and service with
  authentication and audit off (``unaudited_for_benchmark``);
- ``rest_bare_fastapi``: a one-route FastAPI app returning the same
  prediction (the floor a FastAPI server can reach here);
- ``rest_mlserver``: MLServer + mlserver-sklearn serving the same model from
  a joblib file, from ``/tmp/mlserver-venv`` (kept out of our venv); skipped
  with a reason if that venv is missing.

The REST load generator is a minimal asyncio HTTP/1.1 keep-alive client
(pre-built request bytes), so that it costs the shared CPUs less than the
servers it measures; gRPC uses grpc.aio with a pre-built message. Each server
runs in its own process. Usage: ``python bench/gateway.py [--seconds 5]
[--connections 16]``.
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
    from secure.signed_note import generate_note_key
    from server.audit.log import AuditLog
    from server.audit.storage import open_storage
    from server.gateway.build import GatewayConfig, build_gateway
    from server.gateway.runner import Listen
    from server.gateway.runner import run as run_gateway
    from server.registry import load_model_keys

    log = AuditLog(
        open_storage(str(home / f"audit-{mode}.db")), generate_note_key("bench/gateway-audit")
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
    (home / f"audit-{mode}.count").write_text(str(log.size()))
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

    from server.gateway.pb import grpc_service_pb2 as pb
    from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc

    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
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
    parser.add_argument("--serve", nargs=4, metavar=("HOME", "MODE", "HTTP", "GRPC"))
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), args.serve[1], int(args.serve[2]), int(args.serve[3]))
        return
    home = Path(tempfile.mkdtemp(prefix="fedvault-bench-gw-"))
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
    results: dict[str, Any] = {}
    conns, secs = args.connections, args.seconds

    for mode in ("audited", "unaudited"):
        http_port, grpc_port = _free_port(), _free_port()
        proc = _start(
            [sys.executable, __file__, "--serve", str(home), mode, str(http_port), str(grpc_port)]
        )
        try:
            _wait_http(http_port, "/v2/health/live")
            results[f"rest_{mode}"] = asyncio.run(
                load_rest(http_port, f"/v2/models/{MODEL}/infer", oip, token, conns, secs)
            )
            results[f"grpc_{mode}"] = asyncio.run(load_grpc(grpc_port, x, token, conns, secs))
        finally:
            _stop(proc)
        if mode == "audited":
            count = home / "audit-audited.count"
            results["audit_entries_written"] = int(count.read_text()) if count.exists() else None

    port = _free_port()
    proc = _start([sys.executable, __file__, "--serve", str(home), "bare", str(port), "0"])
    try:
        _wait_http(port, "/docs")
        results["rest_bare_fastapi"] = asyncio.run(
            load_rest(port, "/predict", oip, None, conns, secs)
        )
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
            results["rest_mlserver"] = asyncio.run(
                load_rest(port, f"/v2/models/{MODEL}/infer", mlserver_body, None, conns, secs)
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
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "note": "servers and load generator share this machine's CPUs",
    }
    print(json.dumps(results, indent=2))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
