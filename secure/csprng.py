"""Uniform and Gaussian draws from the operating system's CSPRNG.

Why: DP noise and Poisson sampling drawn from a seeded Mersenne Twister can be
predicted by whoever learns the seed or enough outputs, and then subtracted.
Opacus' secure mode wants ``torchcsprng``, which has no build for the torch we
pin, so ``secure_mode`` draws from ``os.urandom`` here instead.

Gaussians use Box–Muller on 53-bit uniforms, and :func:`hardened_normal`
follows Opacus' floating-point hardening (Holohan & Braghin 2021, §5.1, n=2):
the sum of four draws divided by two has the target variance but no longer
exposes the low-order bits of one Box–Muller output.
"""

from __future__ import annotations

import os

import numpy as np
from numpy.typing import NDArray

_MANTISSA_BITS = 53
_SCALE = 1.0 / (1 << _MANTISSA_BITS)


def uniform(n: int) -> NDArray[np.float64]:
    """``n`` independent uniforms on the open interval (0, 1]."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return ((words >> np.uint64(64 - _MANTISSA_BITS)).astype(np.float64) + 1.0) * _SCALE


def standard_normal(n: int) -> NDArray[np.float64]:
    """``n`` independent N(0, 1) draws (Box–Muller, both outputs used)."""
    half = (n + 1) // 2
    u1, u2 = uniform(half), uniform(half)
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def hardened_normal(std: float, n: int) -> NDArray[np.float64]:
    """``n`` draws of N(0, std²), hardened against floating-point attacks."""
    if std == 0:
        return np.zeros(n)
    draws: NDArray[np.float64] = standard_normal(4 * n).reshape(4, n).sum(axis=0)
    return std * draws / 2.0
