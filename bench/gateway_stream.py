"""REST infer vs gRPC unary ModelInfer vs gRPC ModelStreamInfer, same server, one run (JSON).

Why this exists: a unary grpc.aio call costs the Python server several times
the CPU of one REST request on our fast path (call set-up, metadata, status
trailers per call), so unary gRPC stays below REST however the load is
generated. Triton's answer, which tritonclient exposes as ``start_stream`` /
``async_stream_infer``, is the bidirectional ``ModelStreamInfer``: the call
is paid once per stream, every message still authenticated (key re-checked),
authorised, rate limited, validated and audited before its answer. This
script measures the three side by side on the very server ``bench/gateway.py``
starts (its ``--serve`` child: the gateway of ``fedvault gateway start``, audit
writer process, SQLite WAL FULL sync), with auth + audit on (``audited``) and,
for reference, off (``unaudited``), in one run. (The unaudited stream handles
its messages one after another: with nothing to wait for, the audited path's
32-message window would only add its bookkeeping.)

Load generator: ``h2load`` (Debian ``nghttp2-client``; ``--h2load``,
``$H2LOAD`` or PATH, located by ``bench/gateway.py``'s helper), one request in
flight per connection, ``--connections`` connections, 1 s warm-up:

- REST: HTTP/1.1 keep-alive ``POST /v2/models/<m>/infer`` (JSON), 1 inference per request;
- gRPC unary: HTTP/2 ``ModelInfer`` with a framed protobuf body, 1 inference per request;
- gRPC stream: HTTP/2 ``ModelStreamInfer`` whose body holds ``--messages`` N
  length-prefixed ``ModelInferRequest`` messages, so one h2load request is one
  stream of N inferences; the server answers N ``ModelStreamInferResponse``.

Throughput is per inference (requests × N for the stream). ``p50_ms`` /
``p99_ms`` are per h2load request — one inference for REST and unary, a
whole N-message stream for the stream (``per_inference_ms`` = its p50 / N,
the amortised cost, not a per-message percentile). Successes are checked: a
real gRPC client first runs one N-message stream and requires N answers
without ``error_message`` (and one unary call with status OK); under h2load,
answers whose bytes are missing are counted (``responses_without_message``),
and the audited run tallies the audit log by action and status, so every
streamed inference must show up as its own ``grpc:ModelStreamInfer`` / ``OK``
record. Without h2load (or ``--loadgen python``) grpc.aio and asyncio clients
drive the same calls. Usage: ``python bench/gateway_stream.py [--seconds 5]
[--connections 16] [--messages 64]``.
"""

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load_gateway_bench() -> Any:
    """``bench/gateway.py`` as a module: its fixtures, server child and h2load driver."""
    spec = importlib.util.spec_from_file_location(
        "bench_gateway", Path(__file__).with_name("gateway.py")
    )
    assert spec is not None  # the file next to this one
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gwb = _load_gateway_bench()
MODEL: str = gwb.MODEL


# ----------------------------------------------------------------- messages
def stream_body(x: np.ndarray, n: int) -> bytes:  # type: ignore[type-arg]
    """N gRPC-framed ``ModelInferRequest`` messages: one HTTP/2 request body, N inferences."""
    message = gwb._grpc_request(x).SerializeToString()
    return (b"\0" + len(message).to_bytes(4, "big") + message) * n


def stream_preflight(port: int, x: np.ndarray, token: str, n: int) -> int:  # type: ignore[type-arg]
    """One N-message stream through a real gRPC client; raises unless N clean answers.

    Returns the framed size of one answer, to check h2load's byte counts against.
    """
    import grpc

    from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc

    request = gwb._grpc_request(x)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        answers = list(
            stub.ModelStreamInfer(
                iter([request] * n),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=60,
            )
        )
    errors = [a.error_message for a in answers if a.error_message]
    if len(answers) != n or errors:
        raise RuntimeError(f"stream pre-flight: {len(answers)}/{n} answers, errors {errors[:3]}")
    sizes = {len(a.SerializeToString()) for a in answers}
    if len(sizes) != 1:
        raise RuntimeError(f"stream pre-flight: answers of different sizes {sorted(sizes)}")
    return 5 + sizes.pop()


# ----------------------------------------------------- python load generator
async def _stream_worker(
    stub: Any, request: Any, n: int, md: Any, stop_at: float, lat: list[float], bad: list[int]
) -> None:
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        answers = 0
        async for reply in stub.ModelStreamInfer(iter([request] * n), metadata=md):
            answers += 1
            if reply.error_message:
                bad[0] += 1
        lat.append(time.perf_counter() - t0)
        bad[0] += n - answers


async def load_stream_python(
    port: int,
    x: np.ndarray,  # type: ignore[type-arg]
    token: str,
    n: int,
    conns: int,
    seconds: float,
) -> dict[str, Any]:
    """grpc.aio streaming client: ``conns`` streams of N messages back to back."""
    import grpc

    from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc

    request = gwb._grpc_request(x)
    md = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        warm: list[float] = []
        bad = [0]
        await asyncio.gather(
            *[
                _stream_worker(stub, request, n, md, time.perf_counter() + 1.0, warm, bad)
                for _ in range(conns)
            ]
        )
        lat: list[float] = []
        bad = [0]
        start = time.perf_counter()
        await asyncio.gather(
            *[_stream_worker(stub, request, n, md, start + seconds, lat, bad) for _ in range(conns)]
        )
    out: dict[str, Any] = gwb._summary(lat, time.perf_counter() - start, {})
    out["responses_with_error_or_missing"] = bad[0]
    return out


# ----------------------------------------------------------------- harness
def audit_by_action(db: Path) -> dict[str, dict[str, int]]:
    """Audit entries of a finished run: action → status → count."""
    from server.audit.records import decode_entry

    conn = sqlite3.connect(db)
    try:
        tally: dict[str, dict[str, int]] = {}
        for (entry,) in conn.execute("SELECT entry FROM audit_entries"):
            rec = decode_entry(bytes(entry))
            per = tally.setdefault(rec.action, {})
            per[rec.status or "-"] = per.get(rec.status or "-", 0) + 1
    finally:
        conn.close()
    return tally


def _per_inference(out: dict[str, Any], n: int, cpu_s: float, seconds: float) -> dict[str, Any]:
    """Turn per-request counts into per-inference ones (n inferences per request)."""
    requests = out["requests"]
    out["throughput_rps"] = round(requests / seconds, 1)
    out["inferences_per_request"] = n
    out["inferences"] = requests * n
    out["throughput_inferences_per_s"] = round(requests * n / seconds, 1)
    out["server_cpu_us_per_inference"] = (
        round(cpu_s / (requests * n) * 1e6, 1) if requests else None
    )
    if n > 1 and out.get("p50_ms") is not None:
        out["per_inference_ms"] = round(out["p50_ms"] / n, 4)
    return out


@dataclass(frozen=True)
class Driver:
    """The three loads, built once per run; each method drives one server port."""

    h2load: str | None
    x: np.ndarray  # type: ignore[type-arg]
    token: str
    conns: int
    seconds: float
    n: int
    work: Path

    def _run_h2load(self, url: str, body: bytes, headers: list[str], *, h1: bool) -> dict[str, Any]:
        assert self.h2load is not None  # callers check
        out = gwb._h2load(
            self.h2load,
            url,
            body,
            headers,
            h1=h1,
            conns=self.conns,
            seconds=self.seconds,
            work=self.work,
        )
        # Requests that began in the warm-up and ended in the window are in
        # h2load's `succeeded` but not in its per-request log; with N-message
        # streams (~0.1-0.3 s each) that is one request per connection, so
        # count completions rather than logged latencies.
        out["requests"] = out["succeeded"]
        return dict(out)

    def _grpc_headers(self) -> list[str]:
        return [
            "content-type: application/grpc",
            "te: trailers",
            f"authorization: Bearer {self.token}",
        ]

    def rest(self, port: int) -> dict[str, Any]:
        path = f"/v2/models/{MODEL}/infer"
        doc = {
            "inputs": [
                {
                    "name": "features",
                    "shape": list(self.x.shape),
                    "datatype": "FP32",
                    "data": self.x.ravel().tolist(),
                }
            ]
        }
        body = json.dumps(doc).encode()
        if self.h2load is None:
            args = (port, path, body, self.token, self.conns, self.seconds)
            return dict(asyncio.run(gwb.load_rest(*args)))
        headers = ["content-type: application/json", f"authorization: Bearer {self.token}"]
        return self._run_h2load(f"http://127.0.0.1:{port}{path}", body, headers, h1=True)

    def unary(self, port: int) -> dict[str, Any]:
        expected = gwb.grpc_preflight(port, self.x, self.token)  # a real client: status OK
        if self.h2load is None:
            args = (port, self.x, self.token, self.conns, self.seconds)
            return dict(asyncio.run(gwb.load_grpc(*args)))
        message = gwb._grpc_request(self.x).SerializeToString()
        body = b"\0" + len(message).to_bytes(4, "big") + message
        url = f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"
        out = self._run_h2load(url, body, self._grpc_headers(), h1=False)
        out["responses_without_message"] = max(0, out["done"] - out["data_bytes"] // expected)
        return out

    def stream(self, port: int) -> dict[str, Any]:
        expected = stream_preflight(port, self.x, self.token, self.n)  # N clean answers
        if self.h2load is None:
            args = (port, self.x, self.token, self.n, self.conns, self.seconds)
            return asyncio.run(load_stream_python(*args))
        url = f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelStreamInfer"
        out = self._run_h2load(url, stream_body(self.x, self.n), self._grpc_headers(), h1=False)
        # A failed message answers with error_message (another size) and an
        # aborted stream answers fewer messages: both show as missing bytes.
        missing = out["done"] * self.n - out["data_bytes"] // expected
        out["responses_without_message"] = max(0, missing)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--messages", type=int, default=64, help="inferences per stream")
    parser.add_argument("--h2load", help="h2load binary (default: $H2LOAD, then PATH)")
    parser.add_argument("--loadgen", choices=("auto", "h2load", "python"), default="auto")
    parser.add_argument(
        "--modes",
        default="audited,unaudited",
        help="comma-separated: audited (auth + audit on), unaudited (both off, reference)",
    )
    args = parser.parse_args()
    h2load = None if args.loadgen == "python" else gwb.find_h2load(args.h2load)
    if args.loadgen == "h2load" and h2load is None:
        parser.error("h2load not found (Debian: apt-get install nghttp2-client)")
    home = Path(tempfile.mkdtemp(prefix="fedvault-bench-stream-"))
    fsync_before, load_before = gwb.fsync_ms(home), os.getloadavg()
    x_all, _pipe = gwb.prepare(home)
    token = (home / "token").read_text()
    drv = Driver(h2load, x_all[:1], token, args.connections, args.seconds, args.messages, home)
    results: dict[str, Any] = {}

    def timed(pid: int, run: Callable[[], dict[str, Any]], per_request: int) -> dict[str, Any]:
        """``run()`` plus server CPU (process and children), per inference."""
        cpu0 = gwb._tree_cpu_s(pid)
        out = run()
        return _per_inference(out, per_request, gwb._tree_cpu_s(pid) - cpu0, drv.seconds)

    for mode in args.modes.split(","):
        http_port, grpc_port = gwb._free_port(), gwb._free_port()
        cmd = [sys.executable, gwb.__file__, "--serve", str(home), mode]
        proc = gwb._start([*cmd, str(http_port), str(grpc_port)])
        try:
            gwb._wait_http(http_port, "/v2/health/live")
            results[f"rest_{mode}"] = timed(proc.pid, partial(drv.rest, http_port), 1)
            results[f"grpc_unary_{mode}"] = timed(proc.pid, partial(drv.unary, grpc_port), 1)
            results[f"grpc_stream_{mode}"] = timed(proc.pid, partial(drv.stream, grpc_port), drv.n)
        finally:
            gwb._stop(proc)
        if mode == "audited":
            tally: dict[str, Any] = dict(audit_by_action(home / "audit-audited.db"))
            commits = home / "commits-audited.json"
            if commits.exists():  # written by the server on its way out (all three loads)
                counts = json.loads(commits.read_text())
                tally["mean_commit_batch"] = round(counts["items"] / max(counts["batches"], 1), 2)
            results["audit_log_audited"] = tally

    def ratio(a: str, b: str) -> float | None:
        ra = results.get(a, {}).get("throughput_inferences_per_s")
        rb = results.get(b, {}).get("throughput_inferences_per_s")
        return round(ra / rb, 3) if ra and rb else None

    results["comparisons"] = {
        "grpc_unary_vs_rest_audited": ratio("grpc_unary_audited", "rest_audited"),
        "grpc_stream_vs_rest_audited": ratio("grpc_stream_audited", "rest_audited"),
        "grpc_stream_vs_unary_audited": ratio("grpc_stream_audited", "grpc_unary_audited"),
        "grpc_stream_vs_rest_unaudited": ratio("grpc_stream_unaudited", "rest_unaudited"),
        "grpc_stream_auth_audit_overhead": (
            round(1 - r, 3)
            if (r := ratio("grpc_stream_audited", "grpc_stream_unaudited"))
            else None
        ),
        "target": {"grpc_vs_rest": ">= 1.5"},
    }
    results["setup"] = {
        "connections": drv.conns,
        "seconds": drv.seconds,
        "messages_per_stream": drv.n,
        "batch_rows_per_inference": 1,
        **gwb.machine_setup(h2load, home, fsync_before, load_before),
    }
    print(json.dumps(results, indent=2))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
