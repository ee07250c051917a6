"""secure.csprng: OS-CSPRNG uniforms and Gaussians."""

from __future__ import annotations

import numpy as np
import pytest

from secure import csprng


def test_uniform_is_in_the_half_open_unit_interval_and_flat() -> None:
    u = csprng.uniform(200_000)
    assert u.min() > 0.0
    assert u.max() <= 1.0
    assert u.mean() == pytest.approx(0.5, abs=0.005)
    counts, _ = np.histogram(u, bins=10, range=(0.0, 1.0))
    assert counts.min() > 0.95 * 20_000
    assert counts.max() < 1.05 * 20_000


@pytest.mark.parametrize("n", [1, 2, 7, 100_001])
def test_standard_normal_has_the_requested_length(n: int) -> None:
    assert csprng.standard_normal(n).shape == (n,)


def test_standard_normal_moments() -> None:
    z = csprng.standard_normal(200_000)
    assert z.mean() == pytest.approx(0.0, abs=0.01)
    assert z.std() == pytest.approx(1.0, abs=0.01)
    assert np.mean(np.abs(z) > 1.96) == pytest.approx(0.05, abs=0.003)


def test_hardened_normal_has_the_target_std() -> None:
    z = csprng.hardened_normal(3.0, 100_000)
    assert z.std() == pytest.approx(3.0, rel=0.02)
    assert np.all(csprng.hardened_normal(0.0, 5) == 0.0)


def test_two_draws_differ() -> None:
    assert not np.array_equal(csprng.uniform(8), csprng.uniform(8))
