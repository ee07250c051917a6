"""Public bounds asked of the federation: DP quantiles from noisy histograms.

An operator who cannot set a column's bounds from domain knowledge can ask the
partners for them (``fedvault schema draft --dp-bounds``). Each partner counts
its values of every requested numeric column in the bins of one fixed, public
grid (:data:`EDGES`: 0 and ±10^(k/8) from 1e-6 to 1e10, with an underflow and
an overflow bin), and releases the counts with Gaussian noise. One row changes
each column's histogram by one in one bin, so the release of ``c`` columns has
L2 sensitivity ``√c`` (add/remove adjacency); noise of standard deviation
``σ·√c`` makes it a Gaussian mechanism of noise multiplier ``σ``, sampled at
rate 1 for one step: accounted like any other release, in every partner's
ledger, as mechanism :data:`MECHANISM_DP_HISTOGRAM`.

The coordinator only sees the sum of the partners' noisy counts. Bounds are
post-processing: counts below ``THRESHOLD`` times the sum's (public) noise
level are taken as zero, so are bins cut off from the fullest one by more than
``MAX_GAP`` empty bins, then the lower bound is the left edge of the bin
where the cumulative count reaches ``QUANTILE`` of the total, the upper bound
the right edge of the bin where it reaches ``1 − QUANTILE``. Values outside
them (about 0.5 % at each end, more under noise) are refused by the schema as
out of range, so partners see which rows a DP bound excludes when they check
their files. Grid edges are one-eighth decades apart: a bound overshoots the
quantile by at most ~33 %.

Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "EDGES",
    "MECHANISM_DP_HISTOGRAM",
    "QUANTILE",
    "Bounds",
    "bounds_from_counts",
    "histogram",
    "noisy_histograms",
    "summed_noise_std",
]

MECHANISM_DP_HISTOGRAM = "gaussian-histogram"
QUANTILE = 0.005
# Noisy counts below THRESHOLD standard deviations are taken as 0. Among the
# grid's ~260 bins, mostly empty, one empty bin's noise passes 5σ with
# probability 260 · 2.9e-7 < 1e-4 per column (at 3σ it was 0.35, and a
# spurious bin far below the data moved the lower bound there, seen in CI).
# The price: bins holding fewer than 5σ real values are dropped too, which
# pulls a bound inwards past a sparse tail (its values are then clipped).
THRESHOLD = 5.0
MAX_GAP = 2

_MAGNITUDES = 10.0 ** (np.arange(-48, 81) / 8.0)  # 1e-6 .. 1e10
EDGES: NDArray[np.float64] = np.concatenate([-_MAGNITUDES[::-1], [0.0], _MAGNITUDES])
"""Bin edges (ascending). Bin 0 is below EDGES[0], bin i is [EDGES[i-1], EDGES[i]),
the last bin is at or above EDGES[-1]."""
N_BINS = len(EDGES) + 1


@dataclass(frozen=True, slots=True)
class Bounds:
    """A column's DP bounds and the noisy count of values they came from."""

    min: float
    max: float
    count: float


def histogram(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Counts of the finite values of one column in the grid's bins (NaN: missing, skipped)."""
    finite = values[np.isfinite(values)]
    bins = np.searchsorted(EDGES, finite, side="right")
    return np.bincount(bins, minlength=N_BINS).astype(np.float64)


def summed_noise_std(noise_multipliers: Sequence[float], n_columns: int) -> float:
    """Per-bin noise std of the sum of partners' releases of ``n_columns`` columns."""
    return math.sqrt(sum(s * s for s in noise_multipliers) * max(n_columns, 1))


def noisy_histograms(
    columns: Sequence[NDArray[np.float64]], noise_multiplier: float, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Partner side: each column's counts plus Gaussian noise of std ``σ·√c``."""
    counts = np.stack([histogram(c) for c in columns]) if columns else np.zeros((0, N_BINS))
    scale = summed_noise_std([noise_multiplier], len(columns))
    noisy: NDArray[np.float64] = counts + rng.normal(0.0, scale, size=counts.shape)
    return noisy


def _edge(index: int) -> float:
    return float(EDGES[min(max(index, 0), len(EDGES) - 1)])


def _bulk(counts: NDArray[np.float64]) -> NDArray[np.float64]:
    """Only the run of bins around the fullest one (gaps of up to MAX_GAP empty bins).

    A lone bin far from the data that passed the threshold is noise far more
    often than data (seen: 145 counts at 5.4σ near 0.004 for ages 50-101);
    real values sit in neighbouring bins of a 1/8-decade grid. A real but
    isolated cluster is dropped with it: its values are then clipped.
    """
    if not counts.any():
        return counts
    top = int(np.argmax(counts))
    filled = np.flatnonzero(counts)
    lo = hi = top
    for index in filled[filled < top][::-1]:
        if lo - index > MAX_GAP + 1:
            break
        lo = int(index)
    for index in filled[filled > top]:
        if index - hi > MAX_GAP + 1:
            break
        hi = int(index)
    kept = np.zeros_like(counts)
    kept[lo : hi + 1] = counts[lo : hi + 1]
    return kept


def bounds_from_counts(
    counts: NDArray[np.float64],
    noise_std: float,
    *,
    integer: bool = False,
    quantile: float = QUANTILE,
) -> Bounds | None:
    """Coordinator side: bounds from one column's summed noisy counts (None: too few).

    ``noise_std`` is the (public) per-bin noise of the sum. Counts below
    ``THRESHOLD · noise_std`` are taken as 0: hundreds of empty bins would
    otherwise add up their positive noise into a spurious tail far from the data.
    """
    clipped = _bulk(np.where(counts >= THRESHOLD * noise_std, counts, 0.0))
    total = float(clipped.sum())
    if total < 1.0:
        return None
    cumulative = np.cumsum(clipped)
    low_bin = int(np.searchsorted(cumulative, quantile * total, side="left"))
    high_bin = int(np.searchsorted(cumulative, (1.0 - quantile) * total, side="left"))
    lo = _edge(low_bin - 1)  # left edge of the low bin
    hi = _edge(high_bin)  # right edge of the high bin
    if integer:
        lo, hi = float(math.floor(lo)), float(math.ceil(hi))
    if not lo < hi:
        hi = lo + 1.0
    return Bounds(lo, hi, total)
