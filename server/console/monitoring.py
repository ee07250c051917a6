"""A glance at each model's traffic and drift, read from the gateway's own registry.

Read in process (``CollectorRegistry.collect()``), not by scraping
``/metrics``: no HTTP round trip, no key, and the same numbers Prometheus
gets. Without Prometheus' time series the console derives:

- request rate: Δrequests / Δt since the previous console view (the first
  view shows the average since the gateway started);
- error rate: the share of requests that ended in a server-side failure
  (HTTP 5xx; gRPC INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN,
  DATA_LOSS) since start — refusals (4xx) are the caller's, counted apart;
- p99 latency: the histogram quantile since start, interpolated linearly
  inside the bucket as PromQL's ``histogram_quantile`` does;
- drift: the largest per-feature PSI and KS over the current window.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry

__all__ = ["ModelGlance", "Monitor", "histogram_quantile"]

_SERVER_FAULTS: Final = frozenset(
    {"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS"}
)
_CLIENT_ERRORS: Final = frozenset(
    {"INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}
)
PSI_WARN, PSI_ALERT = 0.1, 0.25
KS_WARN, KS_ALERT = 0.1, 0.2


def _is_fault(code: str) -> bool:
    return code in _SERVER_FAULTS or (code.isdigit() and int(code) >= 500)


def _is_refusal(code: str) -> bool:
    return code in _CLIENT_ERRORS or (code.isdigit() and 400 <= int(code) < 500)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``q``-quantile from cumulative ``(upper bound, count)`` buckets (``+Inf`` last)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # beyond the last finite bucket: its bound, as PromQL
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


@dataclass(slots=True)
class ModelGlance:
    model: str
    requests: float = 0.0
    faults: float = 0.0
    refusals: float = 0.0
    rate_per_s: float = 0.0
    p99_s: float | None = None
    buckets: dict[float, float] = field(default_factory=dict)
    drift: list[tuple[str, float, str, float, str, float]] = field(default_factory=list)
    """(version, max PSI, its feature, max KS, its feature, window samples)."""

    @property
    def error_ratio(self) -> float:
        return self.faults / self.requests if self.requests else 0.0


class Monitor:
    """Turns the registry's counters into the glance; remembers the last view for rates."""

    def __init__(
        self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._started = clock()
        self._previous: tuple[float, dict[str, float]] | None = None
        self._lock = threading.Lock()

    def glance(self) -> tuple[list[ModelGlance], float]:
        """Per-model figures (``(all)`` first) and the seconds the rate was measured over."""
        models: dict[str, ModelGlance] = {"(all)": ModelGlance("(all)")}
        psi: dict[tuple[str, str], tuple[float, str]] = {}
        ks: dict[tuple[str, str], tuple[float, str]] = {}
        window: dict[tuple[str, str], float] = {}
        for metric in self._registry.collect():
            for s in metric.samples:
                labels = s.labels
                if s.name == "fedvault_gateway_requests_total":
                    code = labels.get("code", "")
                    for key in ("(all)", labels.get("model", "-")):
                        if key == "-":
                            continue
                        g = models.setdefault(key, ModelGlance(key))
                        g.requests += s.value
                        g.faults += s.value if _is_fault(code) else 0.0
                        g.refusals += s.value if _is_refusal(code) else 0.0
                elif s.name == "fedvault_gateway_request_duration_seconds_bucket":
                    bound = float(labels["le"])
                    for key in ("(all)", labels.get("model", "-")):
                        if key == "-":
                            continue
                        g = models.setdefault(key, ModelGlance(key))
                        g.buckets[bound] = g.buckets.get(bound, 0.0) + s.value
                elif s.name in ("fedvault_drift_psi", "fedvault_drift_ks"):
                    target = psi if s.name == "fedvault_drift_psi" else ks
                    mv = (labels["model"], labels["version"])
                    if s.value > target.get(mv, (-1.0, ""))[0]:
                        target[mv] = (s.value, labels["feature"])
                elif s.name == "fedvault_drift_window_samples":
                    window[(labels["model"], labels["version"])] = s.value
        for (model, version), samples in sorted(window.items()):
            g = models.setdefault(model, ModelGlance(model))
            p, pf = psi.get((model, version), (0.0, "-"))
            k, kf = ks.get((model, version), (0.0, "-"))
            g.drift.append((version, p, pf, k, kf, samples))
        now = self._clock()
        with self._lock:
            previous = self._previous
            self._previous = (now, {m: g.requests for m, g in models.items()})
        if previous is not None and now - previous[0] >= 1.0:
            span = now - previous[0]
            before = previous[1]
        else:
            span = max(now - self._started, 1e-9)
            before = {}
        for m, g in models.items():
            g.rate_per_s = max(0.0, g.requests - before.get(m, 0.0)) / span
            g.p99_s = histogram_quantile(0.99, list(g.buckets.items()))
        ordered = [models.pop("(all)"), *(models[m] for m in sorted(models))]
        return ordered, span
