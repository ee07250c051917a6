"""server.aggregation.aggregate: FedAvg, coordinate-wise median and trimmed mean."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedvault.errors import ConfigError
from fedvault.modelspec import FloatArray
from server.aggregation import aggregate

RULES = ["fedavg", "median", "trimmed-mean"]


def _update(*layers: list[float] | list[list[float]]) -> list[FloatArray]:
    return [np.asarray(layer, dtype=np.float32) for layer in layers]


def test_fedavg_is_the_exact_weighted_mean() -> None:
    a = _update([[1.0, 2.0], [3.0, 4.0]], [10.0])
    b = _update([[5.0, 6.0], [7.0, 8.0]], [-2.0])
    out = aggregate([a, b], [1, 3], rule="fedavg")
    np.testing.assert_array_equal(out[0], np.array([[4.0, 5.0], [6.0, 7.0]], dtype=np.float32))
    np.testing.assert_array_equal(out[1], np.array([1.0], dtype=np.float32))
    assert [o.dtype for o in out] == [np.float32, np.float32]
    assert [o.shape for o in out] == [(2, 2), (1,)]


def test_fedavg_with_equal_weights_is_the_mean() -> None:
    rng = np.random.default_rng(1)
    updates = [[rng.normal(size=(3, 4)).astype(np.float32)] for _ in range(5)]
    out = aggregate(updates, [7.0] * 5, rule="fedavg")
    expected = np.mean([u[0].astype(np.float64) for u in updates], axis=0)
    np.testing.assert_allclose(out[0], expected, rtol=1e-6, atol=1e-7)


def test_fedavg_weights_scale_invariant() -> None:
    updates = [_update([1.0, 0.0]), _update([0.0, 1.0]), _update([2.0, 2.0])]
    a = aggregate(updates, [1, 2, 3], rule="fedavg")
    b = aggregate(updates, [100, 200, 300], rule="fedavg")
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)


def test_median_ignores_one_huge_outlier() -> None:
    honest_a = _update([1.0, -2.0, 0.5], [[1.0]])
    honest_b = _update([1.2, -1.0, 0.7], [[3.0]])
    attacker = _update([1e30, -1e30, 1e30], [[-1e30]])
    out = aggregate([honest_a, attacker, honest_b], [1, 1, 1], rule="median")
    # With one outlier among three, each coordinate's median is the honest value on the
    # outlier's side: the outlier only picks which honest value, never its own.
    np.testing.assert_array_equal(out[0], np.array([1.2, -2.0, 0.7], dtype=np.float32))
    np.testing.assert_array_equal(out[1], np.array([[1.0]], dtype=np.float32))


def test_median_is_unweighted() -> None:
    updates = [_update([0.0]), _update([1.0]), _update([5.0])]
    out = aggregate(updates, [1000, 1, 1], rule="median")
    assert out[0].tolist() == [1.0]


def test_trimmed_mean_on_three_keeps_the_middle() -> None:
    updates = [_update([3.0, 0.0], [9.0]), _update([1.0, 1e20], [8.0]), _update([2.0, -5.0], [7.0])]
    out = aggregate(updates, [1, 1, 1], rule="trimmed-mean", trim_fraction=0.34)
    np.testing.assert_array_equal(out[0], np.array([2.0, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(out[1], np.array([8.0], dtype=np.float32))


def test_trimmed_mean_without_trimming_is_the_mean() -> None:
    updates = [_update([0.0]), _update([1.0]), _update([5.0])]
    out = aggregate(updates, [1, 1, 1], rule="trimmed-mean", trim_fraction=0.0)
    np.testing.assert_allclose(out[0], [2.0])
    # 0.2 * 3 floors to 0: nothing is trimmed either.
    out = aggregate(updates, [1, 1, 1], rule="trimmed-mean")
    np.testing.assert_allclose(out[0], [2.0])


def test_trimmed_mean_drops_k_from_each_end() -> None:
    updates = [_update([float(v)]) for v in (10, 0, 1, 2, 3, 4, 5, 6, 7, -100)]
    out = aggregate(updates, [1] * 10, rule="trimmed-mean", trim_fraction=0.2)
    np.testing.assert_allclose(out[0], [np.mean([1, 2, 3, 4, 5, 6])])


@pytest.mark.parametrize(
    ("updates", "weights", "rule", "match"),
    [
        ([], [], "fedavg", "nothing to aggregate"),
        ([[np.zeros(2, np.float32)]], [1.0, 2.0], "fedavg", "one weight per update"),
        ([[np.zeros(2, np.float32)]] * 2, [1.0], "median", "one weight per update"),
        ([[np.zeros(2, np.float32)]] * 2, [1.0, 0.0], "fedavg", "positive"),
        ([[np.zeros(2, np.float32)]] * 2, [1.0, -1.0], "fedavg", "positive"),
        ([[np.zeros(2, np.float32)]] * 2, [1.0, float("nan")], "fedavg", "positive"),
        ([[np.zeros(2, np.float32)]] * 2, [1.0, 1.0], "mean", "unknown aggregation rule"),
        ([[np.zeros(2, np.float32)]] * 2, [1.0, 1.0], "FedAvg", "unknown aggregation rule"),
    ],
)
def test_invalid_arguments_raise_config_error(
    updates: list[list[FloatArray]], weights: list[float], rule: str, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        aggregate(updates, weights, rule=rule)


layer_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=2, max_side=4),
    elements=st.floats(-1e6, 1e6, width=32, allow_nan=False),
)


@settings(max_examples=30, deadline=None)
@given(
    layers=st.lists(layer_arrays, min_size=1, max_size=3),
    n=st.integers(min_value=1, max_value=6),
    weights=st.lists(st.floats(0.01, 100.0), min_size=6, max_size=6),
    rule=st.sampled_from(RULES),
    trim_fraction=st.floats(0.0, 0.49),
)
def test_aggregate_of_identical_updates_is_that_update(
    layers: list[FloatArray], n: int, weights: list[float], rule: str, trim_fraction: float
) -> None:
    out = aggregate(
        [[layer.copy() for layer in layers] for _ in range(n)],
        weights[:n],
        rule=rule,
        trim_fraction=trim_fraction,
    )
    assert len(out) == len(layers)
    for got, want in zip(out, layers, strict=True):
        assert got.dtype == np.float32
        assert got.shape == want.shape
        # The weighted mean of n equal float32 values is exact up to float64 rounding.
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
