"""Prometheus metrics of the federation: runs, rounds, partner drops, ε spent vs budget.

Why read the federation DB at scrape time instead of instrumenting the
coordinator: the coordinator is Flower's ServerApp, a fresh process per run
that the SuperLink starts and stops, so it has nowhere stable to serve
``/metrics`` from and would lose its counters with every run. The DB holds
every committed round and charge, so a collector that reads it on each scrape
(``fedvault federation up --metrics-port``) reports exactly what was
committed, survives coordinator crashes, and needs no state of its own.

Cardinality is bounded: per-run series exist only for running runs and the
most recent finished one.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fedvault.addresses import check_port
from fedvault.errors import FedvaultError
from server.store import FederationStore, RunRecord, epsilon_by_partner

RUNNING = "running"
STATUSES = ("running", "finished", "stopped", "failed")


class FederationCollector(Collector):
    """Reads ``federation.db`` on every scrape."""

    def __init__(self, db: str | Path, *, password_file: Path | None = None) -> None:
        self.db = db  # a SQLite path or a PostgreSQL URL (without password)
        self.password_file = password_file

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "fedvault_coordinator_up", "1 if the federation database could be read."
        )
        try:
            families = self._families()
        except (FedvaultError, OSError, ValueError, KeyError):
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _families(self) -> list[GaugeMetricFamily]:
        with FederationStore(self.db, password_file=self.password_file) as store:
            runs = store.runs()
            watched = _watched(runs)
            ledgers = {r.run_id: store.ledger(r.run_id) for r in watched}
            rounds = {r.run_id: store.rounds(r.run_id) for r in watched}
        by_status = GaugeMetricFamily(
            "fedvault_coordinator_runs", "Training runs by status.", labels=["status"]
        )
        for status in STATUSES:
            by_status.add_metric([status], float(sum(r.status == status for r in runs)))
        current = GaugeMetricFamily(
            "fedvault_coordinator_run_round", "Last committed round of a run.", labels=["run_id"]
        )
        planned = GaugeMetricFamily(
            "fedvault_coordinator_run_rounds_planned", "Rounds a run plans.", labels=["run_id"]
        )
        drops = GaugeMetricFamily(
            "fedvault_coordinator_run_partner_drops",
            "Partner-rounds dropped (failed, refused or timed out) in a run.",
            labels=["run_id"],
        )
        spent = GaugeMetricFamily(
            "fedvault_coordinator_partner_epsilon_spent",
            "A partner's ε in a run after its latest committed charge.",
            labels=["run_id", "partner"],
        )
        budget = GaugeMetricFamily(
            "fedvault_coordinator_partner_epsilon_budget",
            "The federation's ε budget per partner in a run.",
            labels=["run_id"],
        )
        for run in watched:
            config: dict[str, Any] = run.config
            current.add_metric([run.run_id], float(run.current_round))
            planned.add_metric([run.run_id], float(config.get("rounds", 0)))
            drops.add_metric(
                [run.run_id], float(sum(len(m.get("failed", [])) for _, m in rounds[run.run_id]))
            )
            eps = epsilon_by_partner(ledgers[run.run_id])
            for partner, value in sorted(eps.items()):
                spent.add_metric([run.run_id, partner], value)
            cap = config.get("federation_epsilon_budget") or config.get("target_epsilon")
            if cap is not None:
                budget.add_metric([run.run_id], float(cap))
        return [by_status, current, planned, drops, spent, budget]


def _watched(runs: list[RunRecord]) -> list[RunRecord]:
    """Running runs and the most recent one that ended."""
    running = [r for r in runs if r.status == RUNNING]
    ended = [r for r in runs if r.status != RUNNING]
    return running + ended[-1:]


def serve_federation_metrics(
    db: str | Path,
    host: str,
    port: int,
    *,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    password_file: Path | None = None,
) -> tuple[Any, threading.Thread]:
    """Serve ``/metrics`` (TLS when a certificate is given) from a daemon thread.

    A port outside 1-65535 is refused here: the socket layer would raise
    OverflowError, which no front door maps.
    """
    check_port(port, "--metrics-port")
    registry = CollectorRegistry()
    registry.register(FederationCollector(db, password_file=password_file))
    return start_http_server(
        port,
        addr=host,
        registry=registry,
        certfile=str(certfile) if certfile else None,
        keyfile=str(keyfile) if keyfile else None,
        tls_min_version=ssl.TLSVersion.TLSv1_2 if certfile else None,
    )
