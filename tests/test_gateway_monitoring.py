"""Metrics, drift statistics, and the Prometheus/Grafana files that use them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from server.gateway.drift import DriftWindow, ks_normal, psi_normal
from server.gateway.rest import create_rest_app
from tests.gateway_support import MODEL, build, features
from tests.he_support import live_server

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_psi_and_ks_see_a_shift_but_not_the_reference() -> None:
    rng = np.random.default_rng(0)
    same = rng.standard_normal((4000, 3))
    shifted = same + np.array([0.0, 1.0, 0.0]) * 1.0
    assert psi_normal(same).max() < 0.02
    assert ks_normal(same).max() < 0.03
    psi, ks = psi_normal(shifted), ks_normal(shifted)
    assert psi[1] > 0.5
    assert ks[1] > 0.3
    assert psi[0] < 0.02


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 50), st.integers(1, 5))
def test_window_keeps_the_last_rows(batches: int, rows: int) -> None:
    win = DriftWindow(2, capacity=16)
    seen: list[float] = []
    for b in range(batches):
        values = np.arange(b * rows, (b + 1) * rows, dtype=np.float32)
        win.add(np.stack([values, values], axis=1))
        seen.extend(values.tolist())
    assert sorted(win.snapshot()[:, 0].tolist()) == seen[-16:]


def _metric_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.add(sample.name)
    return names


def test_metrics_exposition_after_traffic(tmp_path: Path) -> None:
    h = build(tmp_path)
    try:
        with live_server(create_rest_app(h.gw)) as url:
            auth = {"Authorization": f"Bearer {h.tokens['analyst']}"}
            x = features(8)
            doc = {
                "inputs": [
                    {"name": "features", "shape": [8, 30], "datatype": "FP32", "data": x.tolist()}
                ]
            }
            for _ in range(3):
                assert (
                    httpx.post(f"{url}/v2/models/{MODEL}/infer", json=doc, headers=auth).status_code
                    == 200
                )
            httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"inputs": []}, headers=auth)
            r = httpx.get(
                f"{url}/metrics", headers={"Authorization": f"Bearer {h.tokens['auditor']}"}
            )
            assert r.status_code == 200
            text = r.text
    finally:
        h.log.close()
    assert (
        'fedvault_gateway_requests_total{code="200",endpoint="infer",model="bc-logreg",'
        'protocol="rest",version="2"} 3.0'
    ) in text
    assert 'code="400",endpoint="infer"' in text
    assert 'fedvault_drift_window_samples{model="bc-logreg",version="2"} 24.0' in text
    assert 'fedvault_drift_psi{feature="mean_radius",model="bc-logreg",version="2"}' in text
    assert (
        'fedvault_privacy_epsilon_spent{model="bc-logreg",partner="beta",version="2"} 2.75' in text
    )
    assert 'fedvault_privacy_epsilon_budget{model="bc-logreg",version="2"} 3.0' in text
    assert "fedvault_audit_append_duration_seconds_count" in text
    assert "fedvault_gateway_ready 1.0" in text
    _check_deploy_files(_metric_names(text))


def _check_deploy_files(exported: set[str]) -> None:
    """Alert rules and dashboard parse, and every fedvault_* series they use is exported."""
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    names = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
    assert {
        "FedvaultGatewayHighErrorRate",
        "FedvaultGatewayP99LatencyHigh",
        "FedvaultAuditAppendFailing",
        "FedvaultInputDrift",
        "FedvaultPrivacyBudgetNearlySpent",
    } <= names
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "fedvault-gateway.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for sub in ("datasources/prometheus.yml", "dashboards/fedvault.yml"):
        assert (
            yaml.safe_load((DEPLOY / "grafana" / "provisioning" / sub).read_text())["apiVersion"]
            == 1
        )
    used = {m for e in exprs for m in re.findall(r"fedvault_[a-z_]+", e)}
    # Failure counters appear only once something failed; they are declared all the same.
    declared_only = {
        "fedvault_audit_append_failures_total",
        "fedvault_model_load_failures_total",
        "fedvault_he_requests_total",
        "fedvault_he_request_duration_seconds_bucket",
    }
    missing = used - exported - declared_only
    assert not missing, missing


@pytest.mark.parametrize("path", sorted((DEPLOY).rglob("*.y*ml")))
def test_deploy_yaml_parses(path: Path) -> None:
    assert yaml.safe_load(path.read_text()) is not None
