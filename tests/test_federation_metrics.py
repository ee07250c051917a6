"""server.federation_metrics: the federation's Prometheus metrics, read from its DB, over TLS."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedvault.cli import federation as fed
from fedvault.cli.processes import free_port
from server.federation_metrics import FederationCollector, serve_federation_metrics
from server.store import FederationStore, LedgerRow
from tests.ledger_support import charge as _charge


def _federation(db: Path) -> None:
    with FederationStore(db) as store:
        config = {"rounds": 3, "dataset": "digits", "federation_epsilon_budget": 3.0}
        store.create_run("run-a", config, {"name": "digits"})
        for round_, eps in ((1, 1.0), (2, 1.8)):
            rows = [LedgerRow("alpha", _charge("run-a", round_, epsilon_after=eps))]
            rows.append(LedgerRow("beta", _charge("run-a", round_, epsilon_after=eps + 0.1)))
            metrics = {"failed": ["gamma"] if round_ == 2 else [], "partners": ["alpha", "beta"]}
            store.commit_round("run-a", round_, rows, metrics, b"state")


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_over_tls_report_rounds_drops_and_epsilon(tmp_path: Path) -> None:
    paths = fed.FederationPaths(tmp_path / "home")
    fed.init_federation(paths, ["alpha"], ["127.0.0.1", "localhost"])
    _federation(paths.db)
    port = free_port()
    server, _thread = serve_federation_metrics(
        paths.db, "127.0.0.1", port, certfile=paths.server_cert, keyfile=paths.server_key
    )
    try:
        context = ssl.create_default_context(cafile=str(paths.ca_cert))
        url = f"https://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            text = response.read().decode()
        # Plain HTTP is refused: the endpoint is TLS only.
        with pytest.raises((ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        server.shutdown()
    samples = _samples(text)
    assert samples[("fedvault_coordinator_up", ())] == 1.0
    assert samples[("fedvault_coordinator_runs", (("status", "running"),))] == 1.0
    assert samples[("fedvault_coordinator_run_round", (("run_id", "run-a"),))] == 2.0
    assert samples[("fedvault_coordinator_run_rounds_planned", (("run_id", "run-a"),))] == 3.0
    assert samples[("fedvault_coordinator_run_partner_drops", (("run_id", "run-a"),))] == 1.0
    key = ("fedvault_coordinator_partner_epsilon_spent", (("partner", "beta"), ("run_id", "run-a")))
    assert samples[key] == pytest.approx(1.9)
    budget = ("fedvault_coordinator_partner_epsilon_budget", (("run_id", "run-a"),))
    assert samples[budget] == 3.0


def test_an_unreadable_database_reports_down_instead_of_failing_the_scrape(
    tmp_path: Path,
) -> None:
    (tmp_path / "federation.db").mkdir()  # a directory where the DB should be
    families = list(FederationCollector(tmp_path / "federation.db").collect())
    assert [f.name for f in families] == ["fedvault_coordinator_up"]
    assert families[0].samples[0].value == 0.0
