"""fedvault.stats: federated standardisation from noisy per-partner sums."""

from __future__ import annotations

import numpy as np
import pytest

from fedvault.encoding import encoding_for
from fedvault.schema import builtin_schema
from fedvault.stats import (
    MIN_SCALED_STD,
    NoisySums,
    Scaler,
    noisy_sums,
    scaler_from_sums,
    sums_noise_std,
)

SCHEMA = encoding_for(builtin_schema("digits"))
D = SCHEMA.width
CENTRE, RADIUS = 8.0, 8.0  # digits pixels are bounded by [0, 16]


def _partners(rng: np.random.Generator) -> list[np.ndarray]:
    parts = []
    for n in (40, 120, 75):
        x = rng.integers(0, 17, size=(n, D)).astype(np.float32)
        x[:, 0] = 0.0  # a blank pixel: constant everywhere
        x[:, 1] = 16.0  # a saturated one
        x[:, 2] = 8.0  # nearly constant: its scaled std falls below the floor
        x[0, 2] = 9.0
        parts.append(x)
    return parts


def test_tiny_noise_recovers_the_pooled_mean_and_std() -> None:
    rng = np.random.default_rng(0)
    parts = _partners(rng)
    total = NoisySums(np.zeros(D), np.zeros(D), 0.0)
    for i, part in enumerate(parts):
        total = total + noisy_sums(part, SCHEMA, 1e-6, np.random.default_rng(100 + i))
    assert total.count == pytest.approx(235.0, abs=1e-3)
    scaler = scaler_from_sums(total, SCHEMA)
    pooled = np.concatenate(parts).astype(np.float64)
    np.testing.assert_allclose(scaler.mean, pooled.mean(axis=0), rtol=1e-3, atol=1e-4)
    std = pooled.std(axis=0)
    above_floor = std / RADIUS > MIN_SCALED_STD
    assert above_floor.sum() == D - 3
    np.testing.assert_allclose(scaler.std[above_floor], std[above_floor], rtol=1e-3)
    # Constant or nearly constant features get the floor, never a near-zero divisor.
    np.testing.assert_allclose(scaler.std[~above_floor], RADIUS * MIN_SCALED_STD, rtol=1e-6)
    z = scaler.apply(pooled.astype(np.float32))
    assert z.dtype == np.float32
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, above_floor].mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(z[:, above_floor].std(axis=0), 1.0, rtol=1e-3)


def test_values_outside_the_schema_bounds_are_clipped() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 17, size=(30, D)).astype(np.float32)
    wild = x.copy()
    wild[::3, :5] = -1000.0
    wild[1::3, 5:9] = 1e9
    wild[2, 10] = 17.5
    clipped = np.clip(wild, 0.0, 16.0)
    a = noisy_sums(wild, SCHEMA, 0.5, np.random.default_rng(7))
    b = noisy_sums(clipped, SCHEMA, 0.5, np.random.default_rng(7))
    np.testing.assert_array_equal(a.sum, b.sum)
    np.testing.assert_array_equal(a.sum_sq, b.sum_sq)
    assert a.count == b.count
    # Each example's contribution is bounded: |s| <= 1 and s^2 <= 1 per feature.
    exact = noisy_sums(wild, SCHEMA, 1e-9, np.random.default_rng(7))
    assert np.all(np.abs(exact.sum) <= 30 + 1e-6)
    assert np.all((exact.sum_sq >= -1e-6) & (exact.sum_sq <= 30 + 1e-6))


def test_noiseless_sums_are_in_scaled_units() -> None:
    x = np.full((4, D), 12.0, dtype=np.float32)
    out = noisy_sums(x, SCHEMA, 1e-12, np.random.default_rng(0))
    np.testing.assert_allclose(out.sum, 4 * (12.0 - CENTRE) / RADIUS, atol=1e-9)
    np.testing.assert_allclose(out.sum_sq, 4 * 0.25, atol=1e-9)
    assert out.count == pytest.approx(4.0, abs=1e-9)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_noise_scale_is_sigma_times_sensitivity(sigma: float) -> None:
    x = np.full((10, D), 8.0, dtype=np.float32)  # scaled value 0: the exact sums are 0
    rng = np.random.default_rng(42)
    draws = [noisy_sums(x, SCHEMA, sigma, rng) for _ in range(200)]
    sums = np.stack([d.sum for d in draws])
    sums_sq = np.stack([d.sum_sq for d in draws])
    counts = np.array([d.count for d in draws]) - 10.0
    expected = sigma * np.sqrt(2 * D + 1)
    # 12800 draws each: the std estimate is within ~1% (sd), so 5% is a wide margin.
    assert sums.std() == pytest.approx(expected, rel=0.05)
    assert sums_sq.std() == pytest.approx(expected, rel=0.05)
    assert abs(sums.mean()) < 0.05 * expected
    assert counts.std() == pytest.approx(expected, rel=0.2)  # only 200 draws


def test_scaler_clamps_wild_noise() -> None:
    # Heavy noise can make the released sums meaningless; the scaler must stay usable.
    total = NoisySums(sum=np.full(D, 1e6), sum_sq=np.full(D, -1e6), count=-50.0)
    scaler = scaler_from_sums(total, SCHEMA)
    assert isinstance(scaler, Scaler)
    assert np.all(np.isfinite(scaler.mean))
    assert np.all(np.isfinite(scaler.std))
    assert np.all((scaler.mean >= 0.0) & (scaler.mean <= 16.0))
    assert np.all(scaler.std >= RADIUS * MIN_SCALED_STD - 1e-12)
    assert np.all(scaler.std <= RADIUS + 1e-12)


def test_noise_aware_shrinkage_pulls_variances_towards_their_mean() -> None:
    # Released with noise, each feature's variance moves towards the features'
    # mean variance, more so the louder the noise; the order of features and
    # the means are kept, and exact sums (noise_std = 0) are left untouched.
    rng = np.random.default_rng(5)
    d, n, sigma = D, 2000, 3.0
    scales = np.linspace(3.2, 5.5, d)  # every scaled std stays above the floor
    x = np.clip(8.0 + rng.normal(size=(n, d)) * scales, 0.0, 16.0).astype(np.float32)
    tau = sums_noise_std([sigma, sigma, sigma], d)
    assert tau == pytest.approx(sigma * np.sqrt(3 * (2 * d + 1)))
    total = noisy_sums(x, SCHEMA, sigma, np.random.default_rng(0))
    raw = scaler_from_sums(total, SCHEMA)
    mild = scaler_from_sums(total, SCHEMA, noise_std=tau / 4)
    strong = scaler_from_sums(total, SCHEMA, noise_std=tau)
    np.testing.assert_array_equal(strong.mean, raw.mean)
    var = [(s.std / RADIUS) ** 2 for s in (raw, mild, strong)]
    assert np.all(var[0] > MIN_SCALED_STD**2)
    centre = var[0].mean()
    assert np.all(np.abs(var[1] - centre) <= np.abs(var[0] - centre) + 1e-12)
    assert np.all(np.abs(var[2] - centre) <= np.abs(var[1] - centre) + 1e-12)
    assert np.abs(var[2] - centre).sum() < 0.9 * np.abs(var[0] - centre).sum()
    assert np.all(np.diff(var[2][np.argsort(var[0])]) >= -1e-12)  # order kept
    exact = noisy_sums(x, SCHEMA, 1e-12, np.random.default_rng(0))
    np.testing.assert_array_equal(
        scaler_from_sums(exact, SCHEMA, noise_std=0.0).std, scaler_from_sums(exact, SCHEMA).std
    )
