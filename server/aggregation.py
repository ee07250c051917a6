"""Aggregation rules for partner updates (pure NumPy).

- ``fedavg``: mean weighted by each partner's number of training examples
  (McMahan et al. 2017).
- ``median``: coordinate-wise median (Yin et al. 2018), robust to a minority of
  arbitrary updates, unweighted by design.
- ``trimmed-mean``: per coordinate, drop the ``trim_fraction`` largest and
  smallest values, average the rest (Yin et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedvault.errors import ConfigError
from fedvault.modelspec import FloatArray


def aggregate(
    updates: Sequence[list[FloatArray]],
    weights: Sequence[float],
    *,
    rule: str,
    trim_fraction: float = 0.2,
) -> list[FloatArray]:
    """Combine per-partner parameter lists into one."""
    if not updates:
        raise ConfigError("nothing to aggregate")
    if len(updates) != len(weights):
        raise ConfigError("one weight per update is required")
    out: list[FloatArray] = []
    for layer in range(len(updates[0])):
        stack = np.stack([u[layer].astype(np.float64) for u in updates])
        if rule == "fedavg":
            w = np.asarray(weights, dtype=np.float64)
            if not np.all(w > 0):
                raise ConfigError("fedavg weights must be positive")
            combined = np.tensordot(w / w.sum(), stack, axes=1)
        elif rule == "median":
            combined = np.median(stack, axis=0)
        elif rule == "trimmed-mean":
            k = math.floor(trim_fraction * len(updates))
            ordered = np.sort(stack, axis=0)
            combined = ordered[k : len(updates) - k].mean(axis=0)
        else:
            raise ConfigError(f"unknown aggregation rule {rule!r}")
        out.append(combined.astype(np.float32))
    return out
