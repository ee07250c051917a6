"""Health and Prometheus metrics of one partner node, served by ``fedvault node start``.

Why the node reports on itself: partner IT runs the node on its own host and
needs to see, without asking the operator, whether the node is up and
connected, how many rounds it has answered and how much of its own privacy
cap is spent. The figures are read from the node's own ledger (the same
SQLite file the ClientApp writes in the transaction of each release), so they
show what was actually released, not what the coordinator believes.

The local data files are re-validated against the schema whenever their
modification time changes: a file replaced in place after start-up would
otherwise only surface as refusals in the middle of a run. Each failure is
counted (``fedvault_node_data_validation_failures_total``) and makes
``/healthz`` report ``degraded``.

Endpoints: ``/healthz`` (JSON, 200 when healthy, 503 otherwise) and
``/metrics`` (Prometheus text format). TLS is used when a certificate and key
are given (the startup kit carries one issued by the federation CA).
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest

from clients.data import CsvFormat, count_valid_rows
from clients.ledger import NodeLedger
from fedvault.errors import FedvaultError
from fedvault.schema import DataSchema

__all__ = ["HealthServer", "NodeMonitor", "NodeWatch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeWatch:
    """What a node monitor looks at: the site's files and its privacy cap."""

    partner: str
    schema: DataSchema
    train_csv: Path
    test_csv: Path
    ledger: Path
    epsilon_cap: float
    cap_delta: float
    csv_format: CsvFormat = field(default_factory=CsvFormat)


class NodeMonitor:
    """Node metrics in a private registry, refreshed from the ledger and data files.

    ``alive`` and ``connected`` are callables so the monitor need not know how
    the SuperNode is run (a child process in ``fedvault node start``).
    """

    def __init__(
        self,
        watch: NodeWatch,
        *,
        alive: Callable[[], bool],
        connected: Callable[[], bool],
    ) -> None:
        self.watch = watch
        self._alive = alive
        self._connected = connected
        self._lock = threading.Lock()
        self._mtimes: dict[Path, float] = {}
        self.last_error: str | None = None
        self.data_ok = True
        self.registry = CollectorRegistry()
        labels = {"partner": watch.partner, "dataset": watch.schema.name}
        names = list(labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=self.registry)

        self._up = gauge("fedvault_node_up", "1 while the SuperNode process runs.")
        self._conn = gauge(
            "fedvault_node_connected", "1 once the SuperLink accepted this node (node id issued)."
        )
        self._rounds = gauge(
            "fedvault_node_rounds_done", "Training rounds answered by this node (all runs)."
        )
        self._spent = gauge(
            "fedvault_node_epsilon_spent", "Lifetime ε released on this dataset (at cap δ)."
        )
        self._cap = gauge("fedvault_node_epsilon_cap", "This node's lifetime ε cap.")
        self._data_ok = gauge(
            "fedvault_node_data_valid", "1 when the local data last validated against the schema."
        )
        self._refreshed = gauge(
            "fedvault_node_last_refresh_timestamp_seconds", "When the figures were last read."
        )
        self._failures = Counter(
            "fedvault_node_data_validation_failures",
            "Validations of the local data against the schema that failed.",
            names,
            registry=self.registry,
        )
        self._labels = labels
        self._cap.labels(**labels).set(watch.epsilon_cap)
        self._failures.labels(**labels)  # export 0 from the start

    def validate_data(self) -> bool:
        """Validate the data files if they changed since the last check; count failures."""
        changed = False
        for path in (self.watch.train_csv, self.watch.test_csv):
            try:
                mtime = path.stat().st_mtime
            except OSError:
                mtime = math.nan
            if self._mtimes.get(path) != mtime:
                changed = True
                self._mtimes[path] = mtime
        if not changed:
            return self.data_ok
        try:
            for path in (self.watch.train_csv, self.watch.test_csv):
                count_valid_rows(path, self.watch.schema, self.watch.csv_format)
        except FedvaultError as exc:
            self.data_ok = False
            self.last_error = str(exc)
            self._failures.labels(**self._labels).inc()
            log.warning("local data no longer valid: %s", exc)
        else:
            self.data_ok = True
            self.last_error = None
        return self.data_ok

    def refresh(self) -> None:
        """Re-read the ledger and re-check the data; never raises (health must answer)."""
        with self._lock:
            labels = self._labels
            self._up.labels(**labels).set(1.0 if self._alive() else 0.0)
            self._conn.labels(**labels).set(1.0 if self._connected() else 0.0)
            self._data_ok.labels(**labels).set(1.0 if self.validate_data() else 0.0)
            try:
                with NodeLedger(self.watch.ledger) as ledger:
                    name = self.watch.schema.name
                    self._rounds.labels(**labels).set(ledger.rounds_answered(name))
                    self._spent.labels(**labels).set(
                        ledger.lifetime_epsilon(name, self.watch.cap_delta, [])
                    )
            except (FedvaultError, OSError) as exc:
                log.warning("cannot read the node ledger %s: %s", self.watch.ledger, exc)
            self._refreshed.labels(**labels).set(time.time())

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body): healthy means running, connected and with valid data."""
        alive, connected = self._alive(), self._connected()
        body: dict[str, Any] = {
            "partner": self.watch.partner,
            "dataset": self.watch.schema.name,
            "supernode": "running" if alive else "stopped",
            "connected": connected,
            "data_valid": self.data_ok,
            "epsilon_cap": self.watch.epsilon_cap,
        }
        if self.last_error is not None:
            body["data_error"] = self.last_error
        healthy = alive and connected and self.data_ok
        body["status"] = "ok" if healthy else "degraded"
        return healthy, body

    def metrics(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """``/healthz`` and ``/metrics`` on a daemon thread, plus a periodic refresher."""

    def __init__(
        self,
        monitor: NodeMonitor,
        host: str,
        port: int,
        *,
        tls: tuple[Path, Path] | None = None,
        refresh_s: float = 5.0,
    ) -> None:
        self.monitor = monitor
        self._refresh_s = refresh_s
        self._stop = threading.Event()
        handler = _handler_for(monitor)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self._threads = [
            threading.Thread(target=self.httpd.serve_forever, name="node-health", daemon=True),
            threading.Thread(target=self._refresh_loop, name="node-metrics", daemon=True),
        ]

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.monitor.refresh()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self._refresh_s):
            self.monitor.refresh()


def _handler_for(monitor: NodeMonitor) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, monitor.metrics(), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/health"):
                healthy, body = monitor.health()
                self._send(200 if healthy else 503, json.dumps(body).encode(), "application/json")
            else:
                self._send(404, b'{"error": "not found"}', "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the node's log

    return Handler
