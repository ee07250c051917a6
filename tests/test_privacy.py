"""fedvault.privacy: RDP accounting, composition and noise calibration.

Every ``epsilon`` call runs Opacus' RDP analysis over ~170 orders (tens of ms),
so the property tests use few, derandomised examples.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedvault.errors import ConfigError
from fedvault.privacy import (
    MECHANISM_DP_SGD,
    MECHANISM_NON_PRIVATE,
    GaussianEvent,
    PrivacyCharge,
    calibrate_noise_multiplier,
    epsilon,
    non_private_charge,
)

DELTA = 1e-5
FEW = settings(max_examples=5, deadline=None, derandomize=True)

sigmas = st.floats(min_value=0.5, max_value=5.0, allow_nan=False)
rates = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)
step_counts = st.integers(min_value=1, max_value=2000)


def test_no_events_cost_nothing() -> None:
    assert epsilon([], DELTA) == 0.0


@FEW
@given(sigma=sigmas, q=rates, steps=step_counts, more=st.integers(min_value=1, max_value=2000))
def test_epsilon_increases_with_steps(sigma: float, q: float, steps: int, more: int) -> None:
    fewer = epsilon([GaussianEvent(sigma, q, steps)], DELTA)
    assert fewer > 0
    assert fewer < epsilon([GaussianEvent(sigma, q, steps + more)], DELTA)


@FEW
@given(
    sigma=sigmas,
    q=st.floats(min_value=1e-3, max_value=0.5, allow_nan=False),
    factor=st.floats(min_value=1.1, max_value=2.0, allow_nan=False),
    steps=step_counts,
)
def test_epsilon_increases_with_sample_rate(
    sigma: float, q: float, factor: float, steps: int
) -> None:
    low = epsilon([GaussianEvent(sigma, q, steps)], DELTA)
    high = epsilon([GaussianEvent(sigma, min(1.0, q * factor), steps)], DELTA)
    assert low < high


@FEW
@given(
    sigma=sigmas,
    factor=st.floats(min_value=1.1, max_value=3.0, allow_nan=False),
    q=rates,
    steps=step_counts,
)
def test_epsilon_decreases_with_noise(sigma: float, factor: float, q: float, steps: int) -> None:
    noisier = epsilon([GaussianEvent(sigma * factor, q, steps)], DELTA)
    assert noisier < epsilon([GaussianEvent(sigma, q, steps)], DELTA)


def test_composition_equals_combined_list_in_any_order() -> None:
    a = GaussianEvent(1.1, 0.05, 300)
    b = GaussianEvent(20.0, 1.0, 1)  # a statistics release
    ab = epsilon([a, b], DELTA)
    assert ab == pytest.approx(epsilon([b, a], DELTA), rel=1e-12)
    assert ab > max(epsilon([a], DELTA), epsilon([b], DELTA))
    # Two charges of the same mechanism compose like one charge of the summed steps.
    split = epsilon([GaussianEvent(1.1, 0.05, 100), GaussianEvent(1.1, 0.05, 200)], DELTA)
    assert split == pytest.approx(epsilon([a], DELTA), rel=1e-9)


@pytest.mark.parametrize(
    "events",
    [[None], [GaussianEvent(1.0, 0.1, 10), None], [None, GaussianEvent(50.0, 0.001, 1)]],
)
def test_a_non_private_release_costs_infinity(events: list[GaussianEvent | None]) -> None:
    assert epsilon(events, DELTA) == math.inf


def test_privacy_charge_event() -> None:
    charge = PrivacyCharge(
        run_id="r",
        round=3,
        mechanism=MECHANISM_DP_SGD,
        noise_multiplier=1.2,
        sample_rate=0.1,
        steps=20,
        max_grad_norm=1.0,
        delta=DELTA,
        accountant="rdp",
        accountant_version="opacus-x",
        epsilon_after=1.5,
    )
    assert charge.event == GaussianEvent(1.2, 0.1, 20)
    assert charge.to_dict()["round"] == 3
    baseline = non_private_charge("r", 1, 0.1, 20, DELTA)
    assert baseline.mechanism == MECHANISM_NON_PRIVATE
    assert baseline.event is None
    assert baseline.epsilon_after == math.inf


@pytest.mark.parametrize(
    ("target", "planned", "prior"),
    [
        # The planned noise multiplier is a placeholder the search replaces.
        (3.0, [GaussianEvent(0.3, 0.1, 100)], []),
        (1.0, [GaussianEvent(1.0, 0.02, 500)], [GaussianEvent(20.0, 1.0, 1)]),
    ],
)
def test_calibration_meets_the_target_tightly(
    target: float, planned: list[GaussianEvent], prior: list[GaussianEvent | None]
) -> None:
    sigma = calibrate_noise_multiplier(target, DELTA, planned, prior=prior)

    def spent(s: float) -> float:
        return epsilon(
            [*prior, *(GaussianEvent(s, p.sample_rate, p.steps) for p in planned)], DELTA
        )

    assert spent(sigma) <= target
    assert spent(sigma * (1 - 0.02)) > target


@pytest.mark.parametrize(
    "prior",
    [
        [None],
        [GaussianEvent(0.6, 1.0, 50)],  # already far beyond ε = 1
    ],
)
def test_calibration_refuses_an_overspent_prior(prior: list[GaussianEvent | None]) -> None:
    with pytest.raises(ConfigError, match="already cost"):
        calibrate_noise_multiplier(1.0, DELTA, [GaussianEvent(1.0, 0.1, 10)], prior=prior)


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_calibration_refuses_an_unreachable_target() -> None:
    with pytest.raises(ConfigError, match="unreachable"):
        calibrate_noise_multiplier(1e-4, DELTA, [GaussianEvent(1.0, 1.0, 10_000)])


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "field"),
    [
        (0.0, 0.1, 1, "noise_multiplier"),
        (-1.0, 0.1, 1, "noise_multiplier"),
        (math.inf, 0.1, 1, "noise_multiplier"),
        (math.nan, 0.1, 1, "noise_multiplier"),
        (1.0, 0.0, 1, "sample_rate"),
        (1.0, -0.1, 1, "sample_rate"),
        (1.0, 1.5, 1, "sample_rate"),
        (1.0, math.nan, 1, "sample_rate"),
        (1.0, 0.1, 0, "steps"),
        (1.0, 0.1, -3, "steps"),
    ],
)
def test_gaussian_event_validation(sigma: float, q: float, steps: int, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        GaussianEvent(sigma, q, steps)


def test_gaussian_event_accepts_the_boundary_rate() -> None:
    assert GaussianEvent(1.0, 1.0, 1).sample_rate == 1.0


def test_accountant_loaded_by_path_is_opacus_own() -> None:
    from opacus.accountants.analysis import rdp as imported

    from fedvault.privacy import RDP_ORDERS, _opacus_rdp

    loaded = _opacus_rdp()
    args = {"q": 0.05, "noise_multiplier": 1.1, "steps": 40, "orders": RDP_ORDERS}
    assert list(loaded.compute_rdp(**args)) == list(imported.compute_rdp(**args))
    rdp = imported.compute_rdp(**args)
    assert loaded.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=1e-5) == (
        imported.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=1e-5)
    )


def test_rdp_is_opacus_own_and_computed_once_per_mechanism(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The memoised one-step curve scaled by the step count must be bit for bit
    # what Opacus returns for those steps; and a mechanism seen before (every
    # round of a run: same σ and q) must not be recomputed: that is what made
    # a 10-partner simulated round cost seconds per partner.
    from fedvault import privacy

    module = privacy._opacus_rdp()
    mechanisms = [(6.0, 1.0, 1), (1.1, 0.05, 40), (0.9, 1 / 3, 7)]
    expected = [0.0] * len(privacy.RDP_ORDERS)
    for sigma, q, steps in mechanisms:
        rdp = module.compute_rdp(
            q=q, noise_multiplier=sigma, steps=steps, orders=privacy.RDP_ORDERS
        )
        expected = [a + float(b) for a, b in zip(expected, rdp, strict=True)]
    events = [
        GaussianEvent(6.0, 1.0, 1),
        GaussianEvent(1.1, 0.05, 20),
        GaussianEvent(0.9, 1 / 3, 7),
        GaussianEvent(1.1, 0.05, 20),
    ]
    privacy._rdp_per_step.cache_clear()
    calls: list[dict[str, object]] = []
    real = module.compute_rdp

    def counting(**kwargs: object) -> object:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(module, "compute_rdp", counting)
    try:
        assert privacy._rdp(events) == expected
        first = epsilon(events, DELTA)
        assert epsilon([*events, GaussianEvent(1.1, 0.05, 20)], DELTA) > first
        assert len(calls) == len(mechanisms)
    finally:
        privacy._rdp_per_step.cache_clear()


def test_node_training_path_does_not_import_torch() -> None:
    # Flower starts a fresh ClientApp process per message: torch's import alone
    # costs ~1.5 s of every round. The default training path and the ledger's
    # accountant must not pull it in.
    import subprocess
    import sys

    code = """
import sys
import numpy as np
import clients.app
from clients.training import LocalPlan, train_local
from fedvault.modelspec import ModelSpec, init_parameters
from fedvault.privacy import GaussianEvent, epsilon
spec = ModelSpec(kind="mlp", n_features=4, n_classes=3, hidden=5)
x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
y = (np.arange(50) % 3).astype(np.int64)
plan = LocalPlan(learning_rate=0.1, momentum=0.0, batch_size=10, steps=3,
                 noise_multiplier=1.0, max_grad_norm=1.0)
train_local(spec, init_parameters(spec, 0), x, y, plan, seed=0)
assert epsilon([GaussianEvent(1.0, 0.2, 3)], 1e-5) > 0
print(sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "opacus"))))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
