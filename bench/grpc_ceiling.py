"""Transport ceilings: empty grpc.aio handlers vs an empty ASGI app on uvicorn (JSON).

Why this exists: the gateway issue asks for gRPC ≥ 1.5× REST. This measures
what the two Python server stacks cost *before any handler code runs*, with
the load generator ``bench/gateway.py`` uses (h2load, 16 connections, one
request in flight each):

- ``grpc_generic``: grpc.aio, a generic unary handler taking and returning
  raw bytes (no protobuf at all);
- ``grpc_servicer``: grpc.aio with the OIP ``GRPCInferenceService`` servicer,
  parsing a real ``ModelInferRequest`` and returning a prebuilt
  ``ModelInferResponse`` (what our unary path pays before its own work);
- ``asgi``: uvicorn (httptools) with a bare ASGI app answering ``{"ok":1}``
  over HTTP/1.1 keep-alive (what ``bench/gateway.py`` drives REST with;
  gRPC is HTTP/2 by definition).

All three run on uvloop when installed, as ``fedvault gateway start`` does.
If an empty gRPC handler is not 1.5× the *full* REST path of
``bench/gateway.py``, no gRPC handler in this stack can be.

Usage: ``python bench/grpc_ceiling.py [--seconds 5] [--runs 2]``; needs
h2load (Debian ``nghttp2-client``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

KINDS = ("grpc_generic", "grpc_servicer", "asgi")


def serve(kind: str, port: int) -> None:
    """The server child: one of KINDS on 127.0.0.1:port until killed."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if kind == "asgi":
        import uvicorn

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            while (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b'{"ok":1}'})

        uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False)
        return

    import grpc

    from server.gateway.pb import grpc_service_pb2 as pb
    from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc

    async def main() -> None:
        server = grpc.aio.server()
        if kind == "grpc_generic":

            async def echo(request: bytes, context: Any) -> bytes:
                return b"\x0a\x01m"

            handler = grpc.unary_unary_rpc_method_handler(echo)
            server.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        "inference.GRPCInferenceService", {"ModelInfer": handler}
                    ),
                )
            )
        else:
            answer = pb.ModelInferResponse(model_name="m", model_version="1")
            answer.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
            answer.raw_output_contents.append(bytes(40))

            class Servicer(pb_grpc.GRPCInferenceServiceServicer):
                async def ModelInfer(self, request: Any, context: Any) -> Any:
                    return answer

            pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _preflight(kind: str, port: int) -> None:
    """One call with a real client: gRPC status OK (or HTTP 200 with the body)."""
    if kind == "asgi":
        import httpx

        answer = httpx.post(f"http://127.0.0.1:{port}/v2/x", content=b"{}", timeout=10)
        if answer.status_code != 200 or answer.content != b'{"ok":1}':
            raise RuntimeError(f"asgi preflight: {answer.status_code}")
        return
    import grpc

    method = "/inference.GRPCInferenceService/ModelInfer"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(method)  # raw bytes both ways
        _, info = call.with_call(b"", timeout=10)
        if info.code() != grpc.StatusCode.OK:
            raise RuntimeError(f"{kind} preflight: {info.code()}")


def measure(kind: str, h2load: str, seconds: float, work: Path) -> float:
    import gateway as gwb  # bench/gateway.py: h2load runner, free ports
    import numpy as np

    port = gwb._free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)])
    try:
        time.sleep(2.0)  # imports + bind; h2load's warm-up second covers the rest
        _preflight(kind, port)  # h2load counts any HTTP 200; a real client checks the status
        if kind == "asgi":
            url, body, h1 = f"http://127.0.0.1:{port}/v2/x", b'{"a":1}', True
            headers = ["content-type: application/json"]
        else:
            message = gwb._grpc_request(np.zeros((1, 64), dtype=np.float32)).SerializeToString()
            body = b"\0" + len(message).to_bytes(4, "big") + message
            url = f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"
            headers, h1 = ["content-type: application/grpc", "te: trailers"], False
        out = gwb._h2load(h2load, url, body, headers, h1=h1, conns=16, seconds=seconds, work=work)
        if out["failed"] or not out["succeeded"]:
            raise RuntimeError(f"{kind}: {out['failed']} failed, {out['succeeded']} succeeded")
        return float(out["throughput_rps"])
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--h2load", help="h2load binary (default: $H2LOAD, then PATH)")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    import gateway as gwb

    h2load = gwb.find_h2load(args.h2load)
    if h2load is None:
        parser.error("h2load not found (Debian: apt-get install nghttp2-client)")
    work = Path(tempfile.mkdtemp(prefix="fedvault-ceiling-"))
    fsync_before, load_before = gwb.fsync_ms(work), os.getloadavg()
    runs: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(args.runs):  # interleaved, so drift hits every kind alike
        for kind in KINDS:
            runs[kind].append(measure(kind, h2load, args.seconds, work))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(
        json.dumps(
            {
                "calls_per_s": runs,
                "median": medians,
                "grpc_generic_vs_asgi": round(medians["grpc_generic"] / medians["asgi"], 3),
                "grpc_servicer_vs_asgi": round(medians["grpc_servicer"] / medians["asgi"], 3),
                "setup": gwb.machine_setup(h2load, work, fsync_before, load_before),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
