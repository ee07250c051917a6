"""Soak: a real ``fedvault gateway start`` under mixed traffic for minutes; does it grow?

A gateway (REST + gRPC, HE extension on, audit writer process, JSON logs) is
started as the CLI starts it, on free loopback ports, in its own session, over
a fresh home with one registered model (breast-cancer logistic regression, 30
FP32 features, HE-capable). Client threads then drive, each at a paced rate
(``--load`` scales them all), for ``--duration`` seconds:

- ``rest``: OIP v2 REST infer of one row (analyst key);
- ``rest_large``: REST infer of 1,000 rows (~270 kB of JSON, decoded by the
  codec worker processes);
- ``grpc``: OIP v2 gRPC ModelInfer of one row;
- ``he_infer``: encrypted inference (the HE SDK's keys, batch layout, a few
  rows encrypted, evaluated by the HE pool, decrypted and checked against the
  plaintext answer);
- ``he_context``: registering a fresh public context and deleting the old one
  (every ``HE_INFERS_PER_CONTEXT`` inferences), the HE state's churn;
- ``audit``: an auditor reading ``/v2/audit`` in turn: checkpoint, a page of
  entries, an inclusion proof, a consistency proof, against the growing log.

Why paced rather than flat out: a soak looks for growth (memory, descriptors,
threads, latency drift), not for a ceiling; a fixed offered load keeps the
windows comparable, and leaves the CPUs to the server on a small machine.

Every ``--interval`` seconds one JSON line goes to stderr: the gateway process
tree's (gateway, audit writer, codec and HE workers: every process of its
session) RSS and PSS, open file descriptors, threads and process count, and
per kind the window's count, errors, 5xx and latency p50/p95/p99. stdout ends
with one JSON summary: the samples, totals, growth between the first and the
last third of the samples after the warm-up, the bounds and ``ok``.

Bounds (after ``--warmup`` seconds, first third vs last third of samples):

- RSS of the tree: mean growth <= max(32 MiB, 10 % of the first third's mean);
- open file descriptors and threads of the tree: max growth <= 16 each;
- per kind, p99 latency of the last third <= max(2 x the first third's p99,
  the first third's p99 + 25 ms) (the absolute slack: a 2 ms p99 doubling
  on a shared machine is noise, not drift);
- no request failed (no 5xx, no 4xx, no transport error), every kind had
  successes, and the gateway stopped cleanly (exit 0) on SIGTERM.

Exit status 1 when any bound is broken. The gateway inherits the environment
(``FEDVAULT_*`` removed), so ``MALLOC_ARENA_MAX=2 python bench/soak.py`` runs
it with glibc's arenas capped: growth that disappears then is the allocator
keeping freed memory in per-thread arenas, not objects kept alive. Usage::

    python bench/soak.py [--duration 600] [--interval 10] [--warmup SECONDS] [--load 1.0]
                         [--traffic rest,rest_large,grpc,he,audit]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = "bc-logreg"
MIB = 1024 * 1024
LARGE_ROWS = 1000  # ~270 kB of JSON: past the codec's offload size
HE_ROWS = 4  # rows per encrypted inference (batch layout)
HE_INFERS_PER_CONTEXT = 10  # then a fresh context is registered and the old one deleted
# Requests/s per thread at --load 1 (kind -> (threads, rate per thread)).
RATES: dict[str, tuple[int, float]] = {
    "rest": (2, 10.0),
    "rest_large": (1, 1.0),
    "grpc": (2, 10.0),
    "he": (1, 0.5),
    "audit": (1, 4.0),
}
KINDS = ("rest", "rest_large", "grpc", "he_infer", "he_context", "audit")
BOUNDS = {
    "rss_growth_mib": "<= max(32, 10% of the first third's mean RSS)",
    "fd_growth": "<= 16",
    "thread_growth": "<= 16",
    "p99_last_third_ms": "<= max(2 x first third p99, first third p99 + 25 ms), per kind",
    "failed_requests": "== 0 (no 5xx, 4xx or transport error)",
    "gateway_exit": "== 0 on SIGTERM",
}


# ------------------------------------------------------------------- fixture
def prepare(home: Path) -> tuple[dict[str, str], np.ndarray, Any]:
    """A home with one sealed, HE-capable model and an analyst and an auditor key."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fedvault.datasets import load_builtin
    from fedvault.modelspec import ModelSpec
    from fedvault.stats import Scaler
    from server.gateway.keys import GatewayStore
    from server.registry import ModelRegistry, ensure_model_keys, load_model_keys
    from server.store import FederationStore

    x, y, _ = load_builtin("breast-cancer")
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    lr = pipe[1]
    d = x.shape[1]
    # Binary LR as a 2-logit softmax: logits [-z/2, z/2] (z = w.x + b) give the same
    # argmax and p. Not [0, z] (bench/gateway.py's): an all-zero weight row makes
    # the HE batch layout fail with a 500 (SEAL: "result ciphertext is transparent").
    w = np.vstack([-lr.coef_[0] / 2, lr.coef_[0] / 2]).astype(np.float32)
    b = np.array([-lr.intercept_[0] / 2, lr.intercept_[0] / 2], dtype=np.float32)
    ensure_model_keys(home / "keys")
    store = FederationStore(home / "federation.db")
    store.create_run("soak", {}, {})
    ModelRegistry(store, home / "registry", load_model_keys(home / "keys")).register(
        name=MODEL,
        run_id="soak",
        spec=ModelSpec(kind="logreg", n_features=d, n_classes=2),
        params=[w, b],
        scaler=Scaler(mean=pipe[0].mean_, std=pipe[0].scale_),
        lineage={"run_id": "soak", "dataset": "breast-cancer", "private": False},
    )
    store.close()
    keys = GatewayStore(home / "gateway.db")
    tokens = {
        "analyst": keys.create_key("analyst", models=frozenset({MODEL}))[0],
        "auditor": keys.create_key("auditor")[0],
    }
    keys.close()
    return tokens, x.astype(np.float32), pipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    url: str
    grpc_target: str
    log_file: Path


@contextmanager
def gateway(home: Path, log_file: Path) -> Iterator[Gateway]:
    """``fedvault gateway start`` (HE on, JSON logs) in its own session; always stopped."""
    http_port, grpc_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDVAULT_")}
    env |= {"PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", "fedvault", "gateway", "start", "--home", str(home)]
    cmd += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    cmd += ["--rate-limit", "0", "--log-format", "json"]
    with log_file.open("wb") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=sink, env=env, cwd=ROOT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while "gateway_started" not in log_file.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start:\n{log_file.read_text()[-2000:]}")
            time.sleep(0.1)
        yield Gateway(proc, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log_file)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in session_pids(proc.pid):  # nothing of ours left behind, whatever failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------- process tree
def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid``: the gateway and everything it started.

    Why the session and not the parent links: the resource tracker and pool
    workers may be re-parented; the session (the gateway was started with a
    new one) still names them.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry))
    return sorted(found)


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def tree_usage(sid: int) -> dict[str, Any]:
    """RSS, PSS, open fds and threads summed over the gateway's session."""
    rss = fds = threads = 0
    pss: int | None = 0
    procs = 0
    for pid in session_pids(sid):
        try:
            rss_pid = _status_kib(pid, "VmRSS")
            threads_pid = _status_kib(pid, "Threads")
            fds_pid = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue  # exited between the listing and the read
        rss, threads, fds, procs = rss + rss_pid, threads + threads_pid, fds + fds_pid, procs + 1
        p = _pss_kib(pid)
        pss = None if pss is None or p is None else pss + p
    return {
        "rss_mib": round(rss / 1024, 1),
        "pss_mib": None if pss is None else round(pss / 1024, 1),
        "fds": fds,
        "threads": threads,
        "processes": procs,
    }


def tree_detail(sid: int) -> list[dict[str, Any]]:
    """Per process of the gateway's session: what it is, its RSS, fds and threads."""
    out = []
    for pid in session_pids(sid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            out.append(
                {
                    "pid": pid,
                    "cmd": cmd.strip()[-90:],
                    "rss_mib": round(_status_kib(pid, "VmRSS") / 1024, 1),
                    "fds": len(os.listdir(f"/proc/{pid}/fd")),
                    "threads": _status_kib(pid, "Threads"),
                }
            )
        except OSError:
            continue
    return out


# ------------------------------------------------------------------- traffic
@dataclass
class Tally:
    """What the client threads saw in the current window, and in all."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    window: dict[str, list[float]] = field(default_factory=dict)  # kind -> latencies (s)
    errors: dict[str, int] = field(default_factory=dict)  # kind -> failed, this window
    server_errors: dict[str, int] = field(default_factory=dict)  # kind -> 5xx, this window
    examples: list[str] = field(default_factory=list)  # the first few failures, for the record

    def ok(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.window.setdefault(kind, []).append(seconds)

    def fail(self, kind: str, what: str, *, server: bool) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            if server:
                self.server_errors[kind] = self.server_errors.get(kind, 0) + 1
            if len(self.examples) < 20:
                self.examples.append(f"{kind}: {what}"[:300])

    def take(self) -> tuple[dict[str, list[float]], dict[str, int], dict[str, int]]:
        with self.lock:
            out = (self.window, self.errors, self.server_errors)
            self.window, self.errors, self.server_errors = {}, {}, {}
        return out


def _paced(rate: float, stop: threading.Event, step: Callable[[], None]) -> None:
    """Call ``step`` about ``rate`` times a second until ``stop``; never bursts to catch up."""
    period = 1.0 / rate
    jitter = random.Random(threading.get_ident())
    next_at = time.monotonic() + jitter.uniform(0, period)
    while not stop.is_set():
        wait = next_at - time.monotonic()
        if wait > 0 and stop.wait(wait):
            return
        next_at = max(next_at + period, time.monotonic())
        step()


def _timed_http(tally: Tally, kind: str, call: Callable[[], Any]) -> Any:
    """``call()`` (an httpx request) timed and tallied; the response when it was a 2xx."""
    import httpx

    t0 = time.perf_counter()
    try:
        response = call()
    except httpx.HTTPError as exc:
        tally.fail(kind, f"{type(exc).__name__}: {exc}", server=False)
        return None
    elapsed = time.perf_counter() - t0
    if 200 <= response.status_code < 300:
        tally.ok(kind, elapsed)
        return response
    tally.fail(
        kind,
        f"HTTP {response.status_code} {response.text[:200]}",
        server=response.status_code >= 500,
    )
    return None


def _oip(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "features",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }


def rest_client(gw: Gateway, token: str, rows: np.ndarray, kind: str) -> Callable[..., None]:
    import httpx

    body = json.dumps(_oip(rows)).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    path = f"/v2/models/{MODEL}/infer"

    def run(tally: Tally, stop: threading.Event, rate: float) -> None:
        with httpx.Client(base_url=gw.url, timeout=30, headers=headers) as client:
            _paced(
                rate,
                stop,
                lambda: _timed_http(tally, kind, lambda: client.post(path, content=body)),
            )

    return run


def grpc_client(gw: Gateway, token: str, row: np.ndarray) -> Callable[..., None]:
    import grpc

    from server.gateway.pb import grpc_service_pb2 as pb
    from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc

    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="features", datatype="FP32", shape=list(row.shape))
    req.raw_input_contents.append(row.tobytes())
    md = (("authorization", f"Bearer {token}"),)
    server_codes = {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
    }

    def run(tally: Tally, stop: threading.Event, rate: float) -> None:
        with grpc.insecure_channel(gw.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]

            def step() -> None:
                t0 = time.perf_counter()
                try:
                    reply = stub.ModelInfer(req, metadata=md, timeout=30)
                except grpc.RpcError as exc:
                    code = exc.code()
                    tally.fail("grpc", f"{code.name} {exc.details()}", server=code in server_codes)
                    return
                if not reply.raw_output_contents and not reply.outputs:
                    tally.fail("grpc", "answer without outputs", server=True)
                    return
                tally.ok("grpc", time.perf_counter() - t0)

            _paced(rate, stop, step)

    return run


def he_client(gw: Gateway, token: str, x: np.ndarray, pipe: Any) -> Callable[..., None]:
    """Encrypted inference with the SDK's keys and ciphertexts, and context churn.

    Raw HTTP rather than ``HEClient.predict``: the soak needs each call's
    status (a 5xx must be told from a 4xx) and its own timing, and ``predict``
    registers a context on every call. Here one context serves
    ``HE_INFERS_PER_CONTEXT`` inferences, then a fresh one is registered and
    the old one deleted, so the soak sees both the steady path and the context
    store's turnover (a leak there grows the tree's memory).
    """
    import httpx

    from secure.client import HEKeys, decrypt_batch, encrypt_batch, params_from_metadata

    headers = {"Authorization": f"Bearer {token}"}

    def run(tally: Tally, stop: threading.Event, rate: float) -> None:
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=gw.url, timeout=120, headers=headers) as client:
            meta = client.get(f"/v2/models/{MODEL}/he")
            meta.raise_for_status()
            model_id = str(meta.json()["model_id"])
            params = params_from_metadata(meta.json())
            relin = bool(meta.json()["keys"]["relin_keys"])
            keys = HEKeys.create(params, galois=False, relin=relin)
            public = keys.public_bytes()
            state: dict[str, Any] = {"context": None, "used": 0}

            def new_context() -> bool:
                """Register a fresh context, then delete the one it replaces (both timed)."""
                made = _timed_http(
                    tally,
                    "he_context",
                    lambda: client.post(
                        f"/v2/models/{model_id}/he/contexts",
                        content=public,
                        headers={"Content-Type": "application/octet-stream"},
                    ),
                )
                if made is None:
                    return False
                old = state["context"]
                state["context"], state["used"] = made.json()["context_id"], 0
                if old is not None:
                    _timed_http(
                        tally, "he_context", lambda: client.delete(f"/v2/he/contexts/{old}")
                    )
                return True

            def step() -> None:
                if state["context"] is None or state["used"] >= HE_INFERS_PER_CONTEXT:
                    if not new_context():
                        return
                rows = x[rng.choice(len(x), HE_ROWS, replace=False)]
                body = {
                    "context_id": state["context"],
                    "layout": "batch",
                    "inputs": [base64.b64encode(c).decode() for c in encrypt_batch(keys, rows)],
                }
                done = _timed_http(
                    tally,
                    "he_infer",
                    lambda: client.post(f"/v2/models/{model_id}/he/infer", json=body),
                )
                if done is None:
                    return
                state["used"] += 1
                out = [base64.b64decode(o) for o in done.json()["outputs"]]
                margin = decrypt_batch(keys, out, len(rows)) @ np.array([-1.0, 1.0])
                # The model's decision function, up to CKKS noise.
                if np.abs(margin - pipe.decision_function(rows)).max() > 0.05:
                    tally.fail("he_infer", "decrypted logits differ from plaintext", server=True)

            _paced(rate, stop, step)

    return run


def audit_client(gw: Gateway, token: str) -> Callable[..., None]:
    """An auditor reading the growing log: checkpoint, entries, inclusion, consistency."""
    import httpx

    def run(tally: Tally, stop: threading.Event, rate: float) -> None:
        rng = random.Random(1)
        turn = [0]
        with httpx.Client(
            base_url=gw.url, timeout=30, headers={"Authorization": f"Bearer {token}"}
        ) as client:

            def size() -> int:
                note = _timed_http(tally, "audit", lambda: client.get("/v2/audit/checkpoint"))
                return int(note.text.splitlines()[1]) if note is not None else 0

            def step() -> None:
                which = turn[0] % 4
                turn[0] += 1
                if which == 0:
                    size()
                    return
                n = size()  # every read is against a size the log really has
                if n < 2:
                    return
                if which == 1:
                    start = rng.randrange(n)
                    query = {"start": start, "end": min(n, start + 64)}
                    path = "/v2/audit/entries"
                elif which == 2:
                    query, path = (
                        {"index": rng.randrange(n), "tree_size": n},
                        "/v2/audit/proof/inclusion",
                    )
                else:
                    query = {"first": rng.randrange(1, n), "second": n}
                    path = "/v2/audit/proof/consistency"
                _timed_http(tally, "audit", lambda: client.get(path, params=query))

            _paced(rate, stop, step)

    return run


# ------------------------------------------------------------------- summary
def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def _latency(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": _pct(values, 0.5),
        "p95_ms": _pct(values, 0.95),
        "p99_ms": _pct(values, 0.99),
    }


def growth(
    samples: list[dict[str, Any]], windows: list[dict[str, list[float]]], warmup_s: float
) -> dict[str, Any]:
    """First third vs last third of the samples taken after the warm-up; bounds checked."""
    post = [i for i, s in enumerate(samples) if s["t_s"] >= warmup_s]
    third = len(post) // 3
    if third < 1:
        return {
            "judged": False,
            "why": f"{len(post)} samples after the warm-up: need 3 or more",
            "ok": False,
        }
    first, last = post[:third], post[-third:]

    def mean(idx: list[int], key: str) -> float:
        return statistics.fmean(samples[i][key] for i in idx)

    def peak(idx: list[int], key: str) -> int:
        return max(int(samples[i][key]) for i in idx)

    rss_first, rss_last = mean(first, "rss_mib"), mean(last, "rss_mib")
    rss_bound = max(32.0, 0.10 * rss_first)
    ts = [samples[i]["t_s"] for i in post]
    rss = [samples[i]["rss_mib"] for i in post]
    slope = float(np.polyfit(ts, rss, 1)[0]) * 60 if len(post) >= 2 else 0.0
    out: dict[str, Any] = {
        "judged": True,
        "samples_after_warmup": len(post),
        "samples_per_third": third,
        "rss_mib": {
            "first_third_mean": round(rss_first, 1),
            "last_third_mean": round(rss_last, 1),
            "growth": round(rss_last - rss_first, 1),
            "bound": round(rss_bound, 1),
            "slope_mib_per_min": round(slope, 2),
        },
        "fds": {"first_third_max": peak(first, "fds"), "last_third_max": peak(last, "fds")},
        "threads": {
            "first_third_max": peak(first, "threads"),
            "last_third_max": peak(last, "threads"),
        },
    }
    if all("loadavg_1m" in samples[i] for i in post):  # latency drift may be the neighbours'
        out["loadavg_1m"] = {
            "first_third_mean": round(mean(first, "loadavg_1m"), 2),
            "last_third_mean": round(mean(last, "loadavg_1m"), 2),
        }
    if all(samples[i]["pss_mib"] is not None for i in post):
        out["pss_mib"] = {
            "first_third_mean": round(mean(first, "pss_mib"), 1),
            "last_third_mean": round(mean(last, "pss_mib"), 1),
        }
    broken = []
    if rss_last - rss_first > rss_bound:
        broken.append("rss_growth_mib")
    for key, name in (("fds", "fd_growth"), ("threads", "thread_growth")):
        out[key]["growth"] = out[key]["last_third_max"] - out[key]["first_third_max"]
        out[key]["bound"] = 16
        if out[key]["growth"] > 16:
            broken.append(name)
    latency: dict[str, Any] = {}
    for kind in KINDS:
        a = [v for i in first for v in windows[i].get(kind, [])]
        b = [v for i in last for v in windows[i].get(kind, [])]
        entry: dict[str, Any] = {"first_third": _latency(a), "last_third": _latency(b)}
        if len(a) >= 5 and len(b) >= 5:
            p_first, p_last = _pct(a, 0.99), _pct(b, 0.99)
            assert p_first is not None
            assert p_last is not None
            entry["bound_ms"] = round(max(2 * p_first, p_first + 25.0), 2)
            entry["ok"] = p_last <= entry["bound_ms"]
            if not entry["ok"]:
                broken.append(f"p99_last_third_ms:{kind}")
        else:
            entry["ok"] = None  # too few calls in a third to judge
        latency[kind] = entry
    out["latency"] = latency
    out["broken"] = broken
    out["ok"] = not broken
    return out


def log_levels(log_file: Path) -> dict[str, Any]:
    """The gateway's own log: lines by level, and lines that were not JSON."""
    levels: dict[str, int] = {}
    non_json = 0
    for line in log_file.read_text(errors="replace").splitlines():
        try:
            level = str(json.loads(line).get("level", "?"))
        except (ValueError, AttributeError):
            non_json += 1
            continue
        levels[level] = levels.get(level, 0) + 1
    return {"by_level": levels, "non_json_lines": non_json}


# ---------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds left out of the growth check (default: 10%% of --duration, >= 2 intervals)",
    )
    parser.add_argument("--load", type=float, default=1.0, help="scales every kind's request rate")
    parser.add_argument(
        "--traffic",
        default=",".join(RATES),
        help=f"comma-separated subset of {','.join(RATES)} (to tell which traffic grows what)",
    )
    args = parser.parse_args()
    traffic = [t for t in args.traffic.split(",") if t]
    if not traffic or set(traffic) - set(RATES):
        parser.error(f"--traffic: choose from {','.join(RATES)}")
    driven = [k for k in KINDS if (k[:2] if k.startswith("he_") else k) in traffic]
    warmup = args.warmup if args.warmup is not None else max(0.1 * args.duration, 2 * args.interval)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="fedvault-soak-"))
    home = work / "home"
    tokens, x, pipe = prepare(home)
    samples: list[dict[str, Any]] = []
    windows: list[dict[str, list[float]]] = []
    totals: dict[str, dict[str, Any]] = {
        k: {"ok": 0, "errors": 0, "5xx": 0, "latencies": []} for k in KINDS
    }
    tally, stop = Tally(), threading.Event()
    thread_errors: list[str] = []
    exit_code: int | None = None
    left: list[int] = []
    detail_first: list[dict[str, Any]] | None = None
    with gateway(home, work / "gateway.log") as gw:
        big = np.resize(x, (LARGE_ROWS, x.shape[1]))
        makers: dict[str, Callable[[], Callable[..., None]]] = {
            "rest": lambda: rest_client(gw, tokens["analyst"], x[:1], "rest"),
            "rest_large": lambda: rest_client(gw, tokens["analyst"], big, "rest_large"),
            "grpc": lambda: grpc_client(gw, tokens["analyst"], x[:1]),
            "he": lambda: he_client(gw, tokens["analyst"], x, pipe),
            "audit": lambda: audit_client(gw, tokens["auditor"]),
        }
        clients = [(t, makers[t]()) for t in traffic for _ in range(RATES[t][0])]

        def guarded(kind: str, run: Callable[..., None]) -> None:
            try:
                run(tally, stop, RATES[kind][1] * args.load)
            except Exception as exc:  # a client's own failure is a result, not a lost thread
                thread_errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])

        threads = [threading.Thread(target=guarded, args=c, daemon=True) for c in clients]
        start = time.monotonic()
        for t in threads:
            t.start()
        try:
            next_at = start + args.interval
            while True:
                end = start + args.duration
                time.sleep(max(0.0, min(next_at, end) - time.monotonic()))
                now = time.monotonic()
                window, errors, server_errors = tally.take()
                sample: dict[str, Any] = {
                    "t_s": round(now - start, 1),
                    **tree_usage(gw.proc.pid),
                    "loadavg_1m": round(os.getloadavg()[0], 2),  # the neighbours' share too
                }
                sample["kinds"] = {
                    kind: {
                        **_latency(window.get(kind, [])),
                        "errors": errors.get(kind, 0),
                        "5xx": server_errors.get(kind, 0),
                    }
                    for kind in KINDS
                }
                for kind in KINDS:
                    totals[kind]["ok"] += len(window.get(kind, []))
                    totals[kind]["errors"] += errors.get(kind, 0)
                    totals[kind]["5xx"] += server_errors.get(kind, 0)
                    totals[kind]["latencies"] += window.get(kind, [])
                samples.append(sample)
                if detail_first is None and sample["t_s"] >= warmup:
                    detail_first = tree_detail(gw.proc.pid)
                windows.append(window)
                print(json.dumps(sample), file=sys.stderr, flush=True)
                if now >= end - 0.05 or gw.proc.poll() is not None:
                    break
                next_at += args.interval
        finally:
            stop.set()
            for t in threads:
                t.join(150)
        detail_last = tree_detail(gw.proc.pid)
        stuck = [c[0] for c, t in zip(clients, threads, strict=True) if t.is_alive()]
        window, errors, server_errors = tally.take()  # calls that finished after the last sample
        for kind in KINDS:
            totals[kind]["ok"] += len(window.get(kind, []))
            totals[kind]["errors"] += errors.get(kind, 0)
            totals[kind]["5xx"] += server_errors.get(kind, 0)
        if gw.proc.poll() is None:
            gw.proc.send_signal(signal.SIGTERM)
            try:
                exit_code = gw.proc.wait(60)
            except subprocess.TimeoutExpired:
                exit_code = None
        else:
            exit_code = gw.proc.returncode
        deadline = time.monotonic() + 15  # the writer and the pools go with it
        while (left := session_pids(gw.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        logs = log_levels(gw.log_file)
    judged = growth(samples, windows, warmup)
    failed = {k: v["errors"] for k, v in totals.items() if v["errors"]}
    no_success = [k for k in driven if totals[k]["ok"] == 0]
    broken = list(judged.get("broken", [])) if judged["judged"] else ["too_few_samples"]
    broken += [f"failed_requests:{k}" for k in failed]
    broken += [f"no_successes:{k}" for k in no_success]
    broken += ["gateway_exit"] if exit_code != 0 else []
    broken += ["processes_left_after_stop"] if left else []
    broken += [f"client_thread:{e}" for e in thread_errors] + [f"client_stuck:{k}" for k in stuck]
    summary = {
        "benchmark": "bench/soak.py",
        "duration_s": args.duration,
        "interval_s": args.interval,
        "warmup_s": warmup,
        "offered_rps": {t: round(RATES[t][0] * RATES[t][1] * args.load, 2) for t in traffic},
        "totals": {
            kind: {
                "ok": v["ok"],
                "errors": v["errors"],
                "5xx": v["5xx"],
                "rps": round(v["ok"] / args.duration, 2),
                **{k: val for k, val in _latency(v["latencies"]).items() if k != "n"},
            }
            for kind, v in totals.items()
        },
        "failure_examples": tally.examples,
        "growth": judged,
        "tree_first_sample": {
            k: samples[0][k] for k in ("rss_mib", "pss_mib", "fds", "threads", "processes")
        }
        if samples
        else None,
        "tree_last_sample": {
            k: samples[-1][k] for k in ("rss_mib", "pss_mib", "fds", "threads", "processes")
        }
        if samples
        else None,
        "processes_after_warmup": detail_first,
        "processes_at_end": detail_last,
        "gateway_exit_code": exit_code,
        "processes_left_after_stop": len(left),
        "gateway_log": logs,
        "bounds": BOUNDS,
        "broken": broken,
        "ok": not broken,
        "setup": {
            "cpus": os.cpu_count(),
            "loadavg_1m": {
                "before": round(load_before[0], 2),
                "after": round(os.getloadavg()[0], 2),
            },
            "note": "gateway and clients share this machine's CPUs",
            # glibc's per-thread arenas hold freed memory: RSS growth with and
            # without a cap tells fragmentation from a leak (set it in the environment).
            "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
        },
        "samples": samples,
    }
    print(json.dumps(summary, indent=2))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
