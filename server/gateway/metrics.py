"""Prometheus metrics of the gateway, in one registry per gateway instance.

Names follow Prometheus conventions (``_total`` counters, ``_seconds``
histograms, base units). Labels are bounded: ``endpoint`` is the route
template, never a raw path; ``model``/``version`` come from the repository
(an unknown name requested by a caller is recorded as ``-``), ``code`` is the
HTTP status or the gRPC status name.

Drift and privacy gauges are computed at scrape time by a custom collector,
so the request path only appends rows to a ring buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.gateway.drift import DriftWindow, ks_normal, psi_normal
from server.gateway.repository import LoadFailure, ModelRepository, ServedModel

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def _budget(model: ServedModel) -> float | None:
    hp = model.lineage.get("hyperparameters", {})
    value = hp.get("federation_epsilon_budget") or hp.get("target_epsilon")
    return float(value) if isinstance(value, int | float) else None


class _ScrapeTimeCollector(Collector):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Any]:
        psi = GaugeMetricFamily(
            "fedvault_drift_psi",
            "Population stability index of a feature over the sliding window vs the "
            "training reference (normal with the registered mean/std).",
            labels=["model", "version", "feature"],
        )
        ks = GaugeMetricFamily(
            "fedvault_drift_ks",
            "Kolmogorov-Smirnov distance of a feature over the sliding window vs the "
            "training reference.",
            labels=["model", "version", "feature"],
        )
        window = GaugeMetricFamily(
            "fedvault_drift_window_samples",
            "Plaintext input rows in the drift window (HE inputs are invisible by design).",
            labels=["model", "version"],
        )
        for (name, version), win in sorted(self._m.windows.items()):
            z = win.snapshot()
            window.add_metric([name, version], float(len(z)))
            if len(z) == 0:
                continue
            names = self._m.input_names.get((name, version), ())
            for j, (p, k) in enumerate(zip(psi_normal(z), ks_normal(z), strict=True)):
                feature = names[j] if j < len(names) else f"x{j}"
                psi.add_metric([name, version, feature], float(p))
                ks.add_metric([name, version, feature], float(k))
        spent = GaugeMetricFamily(
            "fedvault_privacy_epsilon_spent",
            "Epsilon spent per partner for a served model, from its registry lineage.",
            labels=["model", "version", "partner"],
        )
        budget = GaugeMetricFamily(
            "fedvault_privacy_epsilon_budget",
            "Epsilon budget per partner of the run that trained a served model.",
            labels=["model", "version"],
        )
        for m in self._m.repository.all_served() if self._m.repository else ():
            for partner, eps in sorted(m.lineage.get("epsilon", {}).items()):
                spent.add_metric([m.name, m.version, str(partner)], float(eps))
            cap = _budget(m)
            if cap is not None:
                budget.add_metric([m.name, m.version], cap)
        yield from (psi, ks, window, spent, budget)


class GatewayMetrics:
    """Every metric the gateway exports, bound to its own registry."""

    def __init__(self, repository: ModelRepository | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.repository = repository
        self.windows: dict[tuple[str, str], DriftWindow] = {}
        # Drift labels per model version: the model's input names (``age``,
        # ``sex=F``, ``creatinine__missing``) where its schema is known.
        self.input_names: dict[tuple[str, str], tuple[str, ...]] = {}
        # Pre-bound (counter, histogram) children per label set: ``labels()`` costs a
        # lock and a label validation on every call.
        self._children: dict[tuple[str, ...], tuple[Any, Any]] = {}
        r = self.registry
        self.requests = Counter(
            "fedvault_gateway_requests",
            "Requests handled, by protocol, endpoint, model, version and status code.",
            ["protocol", "endpoint", "model", "version", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "fedvault_gateway_request_duration_seconds",
            "Time from request arrival to response (audit append included).",
            ["protocol", "endpoint", "model", "version", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.he_requests = Counter(
            "fedvault_he_requests",
            "Homomorphic-encryption requests, by endpoint, model and status code.",
            ["endpoint", "model", "code"],
            registry=r,
        )
        self.he_latency = Histogram(
            "fedvault_he_request_duration_seconds",
            "Latency of homomorphic-encryption requests.",
            ["endpoint", "model"],
            buckets=(*_LATENCY_BUCKETS, 30.0, 60.0),
            registry=r,
        )
        self.audit_latency = Histogram(
            "fedvault_audit_append_duration_seconds",
            "Time to durably append one audit record (group commit included).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.audit_failures = Counter(
            "fedvault_audit_append_failures",
            "Audit appends that failed (each failed its request with 503).",
            registry=r,
        )
        self.load_failures = Counter(
            "fedvault_model_load_failures",
            "Model versions refused at load (signature, decryption or missing artifact).",
            ["model", "version"],
            registry=r,
        )
        self.ready = Gauge(
            "fedvault_gateway_ready",
            "1 when the gateway can serve (models loaded, audit log writable).",
            registry=r,
        )
        r.register(_ScrapeTimeCollector(self))

    def observe_audit(self, seconds: float, ok: bool) -> None:
        self.audit_latency.observe(seconds)
        if not ok:
            self.audit_failures.inc()

    def load_failed(self, failure: LoadFailure) -> None:
        self.load_failures.labels(failure.name, failure.version).inc()

    def window(self, model: ServedModel) -> DriftWindow:
        key = (model.name, model.version)
        win = self.windows.get(key)
        if win is None:
            win = self.windows.setdefault(key, DriftWindow(model.spec.n_features))
            if model.raw is not None:
                self.input_names[key] = model.raw.encoding.names
        return win

    def observe_request(
        self,
        protocol: str,
        endpoint: str,
        model: str | None,
        version: str | None,
        code: str,
        seconds: float,
    ) -> None:
        labels = (protocol, endpoint, model or "-", version or "-", code)
        children = self._children.get(labels)
        if children is None:  # first request with these labels: bind the children once
            if len(self._children) > 10_000:
                self._children.clear()
            children = (self.requests.labels(*labels), self.latency.labels(*labels))
            self._children[labels] = children
        children[0].inc()
        children[1].observe(seconds)
        if endpoint.startswith("he_"):
            self.he_requests.labels(endpoint, model or "-", code).inc()
            self.he_latency.labels(endpoint, model or "-").observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
