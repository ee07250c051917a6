"""Input drift of plaintext inference: per-feature PSI and KS over a sliding window.

Reference distribution — an assumption, stated: the registry keeps, for each
model, only the standardisation the federation computed under DP (per-feature
mean and standard deviation from noisy sums). No partner ever released
histograms or quantiles of its data, and asking for them would spend privacy
budget, so the reference is the *normal distribution with that mean and
standard deviation*. On standardised inputs that is N(0, 1) for every
feature: PSI uses 10 equiprobable bins cut at the standard-normal deciles and
KS the distance to the standard-normal CDF. For features far from normal
(pixel counts with many zeros) the level of PSI/KS is therefore biased
upwards even without drift: alert on a change against the level measured on
held-out data, not on an absolute value.

HE inputs are invisible by design: encrypted inference never sees features,
so drift is measured on plaintext requests only.

Pure apart from the window's lock: no I/O, no clock.
"""

from __future__ import annotations

import threading
from statistics import NormalDist

import numpy as np
from numpy.typing import NDArray

__all__ = ["BINS", "DriftWindow", "ks_normal", "psi_normal"]

BINS = 10
_EDGES = np.array([NormalDist().inv_cdf(i / BINS) for i in range(1, BINS)])
_EPS = 1e-4  # floor for empty bins (PSI's log would be infinite)
_SQRT2 = np.sqrt(2.0)


def _phi(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Standard normal CDF (vectorised erf approximation; scipy stays out of the server)."""
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): enough for a monitoring statistic.
    z = np.abs(x) / _SQRT2
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    erf = 1.0 - poly * np.exp(-z * z)
    out: NDArray[np.float64] = 0.5 * (1.0 + np.sign(x) * erf)
    return out


def psi_normal(z: NDArray[np.float64]) -> NDArray[np.float64]:
    """PSI of each column of ``z`` (n, d) against N(0, 1): Σ (a − e) ln(a / e)."""
    n, d = z.shape
    if n == 0:
        return np.zeros(d)
    counts = np.stack(
        [np.bincount(np.searchsorted(_EDGES, z[:, j]), minlength=BINS) for j in range(d)]
    )
    actual = np.maximum(counts / n, _EPS)
    expected = 1.0 / BINS
    out: NDArray[np.float64] = ((actual - expected) * np.log(actual / expected)).sum(axis=1)
    return out


def ks_normal(z: NDArray[np.float64]) -> NDArray[np.float64]:
    """Kolmogorov–Smirnov distance of each column of ``z`` to the N(0, 1) CDF."""
    n, d = z.shape
    if n == 0:
        return np.zeros(d)
    cdf = _phi(np.sort(z, axis=0))
    i = np.arange(1, n + 1)[:, None]
    out: NDArray[np.float64] = np.maximum(i / n - cdf, cdf - (i - 1) / n).max(axis=0)
    return out


class DriftWindow:
    """The last ``capacity`` standardised rows of one model version (a ring buffer)."""

    def __init__(self, n_features: int, capacity: int = 2048) -> None:
        self._buf = np.zeros((capacity, n_features), dtype=np.float32)
        self._next = 0
        self._full = False
        self._lock = threading.Lock()

    def add(self, z: NDArray[np.float32]) -> None:
        cap = self._buf.shape[0]
        rows = z[-cap:]
        with self._lock:
            end = self._next + len(rows)
            if end <= cap:
                self._buf[self._next : end] = rows
            else:
                first = cap - self._next
                self._buf[self._next :] = rows[:first]
                self._buf[: end - cap] = rows[first:]
            self._full = self._full or end >= cap
            self._next = end % cap

    def snapshot(self) -> NDArray[np.float64]:
        with self._lock:
            rows = self._buf if self._full else self._buf[: self._next]
            return rows.astype(np.float64)
