"""Probe ``/v2/health/live`` on a fixed schedule while one large infer request is served.

Usage: python -m tests.gateway_clients.health_under_load URL TOKEN MODEL BODY_FILE PERIOD_S
Prints JSON: the infer status, how long it took, its outputs' shapes and first
values, and every probe's latency counted from when the probe was *due*
(open loop: a stalled server delays every probe it holds up, not only the
one in flight).

Why a child process: the client's own work (sending the body, parsing the
answer, running the probes) would otherwise share the server's interpreter
lock and stall the server it is measuring.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx


def probe(url: str, period_s: float, stop: threading.Event) -> list[float]:
    """Latencies of health probes sent every ``period_s`` until ``stop`` is set."""

    async def one(client: httpx.AsyncClient, due: float) -> float:
        r = await client.get(url + "/v2/health/live")
        r.raise_for_status()
        return time.perf_counter() - due

    async def run() -> list[float]:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            tasks = []
            start = time.perf_counter()
            while not stop.is_set():
                due = start + len(tasks) * period_s
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                tasks.append(asyncio.create_task(one(client, due)))
            return list(await asyncio.gather(*tasks))

    return asyncio.run(run())


def main() -> None:
    url, token, model, body_file, period = sys.argv[1:6]
    body = Path(body_file).read_bytes()
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=lambda: latencies.extend(probe(url, float(period), stop)))
    prober.start()
    time.sleep(0.2)  # probes running before the large request starts
    t0 = time.perf_counter()
    with httpx.Client(timeout=60) as client:
        r = client.post(
            f"{url}/v2/models/{model}/infer",
            # In 1 MiB pieces: given whole, h11 joins it into one more copy, which
            # holds this process's GIL (and stalls its probes) ~0.1 s per 50 MB.
            content=(body[i : i + 2**20] for i in range(0, len(body), 2**20)),
            headers={"Authorization": f"Bearer {token}", "Content-Length": str(len(body))},
        )
    served_s = time.perf_counter() - t0
    stop.set()
    prober.join(30)
    outputs: dict[str, Any] = {}
    if r.status_code == 200:
        for out in r.json()["outputs"]:
            outputs[out["name"]] = {"shape": out["shape"], "head": out["data"][:10]}
    print(
        json.dumps(
            {
                "status": r.status_code,
                "served_s": served_s,
                "outputs": outputs,
                "latencies": latencies,
            }
        )
    )


if __name__ == "__main__":
    main()
