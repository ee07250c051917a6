"""One large infer request does not stall the others (issue 16 #9).

The largest body the (test-sized, 8 MiB) limit allows is served while
``/v2/health/live`` is probed every 10 ms by a client in a child process
(tests/gateway_clients/health_under_load.py), each probe's latency counted
from when it was due. Before the codecs left the event loop this request
held the loop long enough for a health p99 of 130-220 ms (2-core machine);
with them, 19-39 ms; the bound is 50 ms. The promises around the request still hold: it is
answered correctly, audited with its digest, and one byte over the limit is
a 413.
"""

from __future__ import annotations

import gc
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from server.audit.records import decode_entry
from server.gateway.rest import Limits, create_rest_app
from tests.gateway_support import MODEL, build, expected_logits, features
from tests.he_support import live_server

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 8 * 1024**2
PERIOD_S = 0.01
P99_BOUND_S = 0.050
ATTEMPTS = 3
"""Runs until one meets the bound: a stalled loop fails every run (the stall is the
code's), a CI neighbour's burst of load fails one run (a stall of the machine's)."""


def _largest_body(limit: int) -> tuple[bytes, np.ndarray]:  # type: ignore[type-arg]
    """A JSON infer body of exactly ``limit`` bytes: as many real rows (cycled) as fit."""
    rows = features(100)
    encoded = [json.dumps(r) for r in rows.tolist()]
    head = b'{"inputs":[{"name":"features","datatype":"FP32","shape":[%d,30],"data":['
    tail = b"]}]}"
    budget = limit - len(head % 10**6) - len(tail)
    sizes = np.cumsum([len(encoded[i % len(encoded)]) + 1 for i in range(budget // 100)])
    n = int(np.searchsorted(sizes, budget + 1))  # rows whose text (with commas) fits
    body = head % n + ",".join(encoded[i % len(encoded)] for i in range(n)).encode() + tail
    assert limit - 1000 < len(body) <= limit
    body += b" " * (limit - len(body))  # JSON's trailing whitespace: exactly the limit
    return body, rows[np.arange(n) % len(rows)]


def test_health_p99_stays_under_50ms_while_the_largest_request_is_served(
    tmp_path: Path,
) -> None:
    h = build(tmp_path / "home", limits=Limits(max_body_bytes=LIMIT))
    body, x = _largest_body(LIMIT)
    body_file = tmp_path / "body.json"
    body_file.write_bytes(body)
    token = h.tokens["analyst"]
    try:
        h.gw.codec.start().result(timeout=60)  # as the gateway does once it listens
        # This process also holds pytest's, scikit-learn's and the harness's
        # objects: a full collection of those, started on the server's thread,
        # stalls it 0.1-0.4 s on a busy machine whatever the gateway does.
        # Frozen, collections see only what the requests allocate.
        gc.collect()
        gc.freeze()
        with live_server(create_rest_app(h.gw)) as url:
            runs: list[tuple[float, str]] = []
            for _ in range(ATTEMPTS):
                seen = _serve_largest_while_probing(url, token, body_file)
                # Audited as before: the record of this request, with the body's digest.
                size = h.log.size()
                ((_, entry),) = h.log.entries(size - 1, size)
                record = decode_entry(entry)
                assert seen["status"] == 200
                assert record.status == "200"
                assert record.request_digest == hashlib.sha256(body).hexdigest()
                runs.append(_p99(seen, len(body)))
                if runs[-1][0] <= P99_BOUND_S:
                    break
            # The body limit still holds at the byte.
            over = httpx.post(
                f"{url}/v2/models/{MODEL}/infer",
                content=body + b" ",
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
            )
    finally:
        gc.unfreeze()
        h.gw.codec.close()
        h.log.close()
    assert seen["outputs"]["logits"]["shape"] == [len(x), 2]
    logits = np.asarray(seen["outputs"]["logits"]["head"], dtype=np.float32).reshape(5, 2)
    np.testing.assert_allclose(logits, expected_logits(h, "2", x[:5]), rtol=1e-5, atol=1e-5)
    assert over.status_code == 413
    summary = "; ".join(line for _, line in runs)
    print(summary)
    assert min(p99 for p99, _ in runs) <= P99_BOUND_S, summary


def _serve_largest_while_probing(url: str, token: str, body_file: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.gateway_clients.health_under_load",
            url,
            token,
            MODEL,
            str(body_file),
            str(PERIOD_S),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen: dict[str, Any] = json.loads(proc.stdout)
    return seen


def _p99(seen: dict[str, Any], size: int) -> tuple[float, str]:
    """Health p99 of one run and a line describing it."""
    ordered = sorted(seen["latencies"])
    assert len(ordered) >= 20
    p99: float = ordered[int(0.99 * (len(ordered) - 1))]
    line = (
        f"{size / 1e6:.1f} MB served in {seen['served_s']:.2f} s; health n={len(ordered)} "
        f"p50={ordered[len(ordered) // 2] * 1e3:.1f} ms p99={p99 * 1e3:.1f} ms "
        f"max={ordered[-1] * 1e3:.1f} ms"
    )
    return p99, line
