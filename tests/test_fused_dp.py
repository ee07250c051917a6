"""clients.fused_dp: the one-pass DP-SGD step against Opacus, its noise and sampling."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from clients.fused_dp import FusedPlan, _batches, run_steps
from clients.training import LocalPlan, train_local
from fedvault.modelspec import FloatArray, ModelSpec, init_parameters

N, D, K = 240, 20, 4
SPECS = [
    ModelSpec(kind="logreg", n_features=D, n_classes=K),
    ModelSpec(kind="mlp", n_features=D, n_classes=K, hidden=8, activation="square"),
    ModelSpec(kind="mlp", n_features=D, n_classes=K, hidden=8, activation="relu"),
    ModelSpec(kind="mlp", n_features=D, n_classes=K, hidden=8, activation="quad", quad_alpha=0.3),
]
pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning"),
]


def _data() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D)).astype(np.float32) * 2.0
    y = rng.integers(0, K, size=N).astype(np.int64)
    return x, y


def _max_diff(a: list[FloatArray], b: list[FloatArray]) -> float:
    return max(float(np.abs(p - q).max()) for p, q in zip(a, b, strict=True))


def _opacus_reference(
    spec: ModelSpec,
    params: list[FloatArray],
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    batches: list[NDArray[np.intp]],
    plan: FusedPlan,
) -> list[FloatArray]:
    """The same steps through Opacus' GradSampleModule + DPOptimizer, σ = 0."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from clients.model import build_model, get_parameters, load_parameters

    model = build_model(spec)
    load_parameters(model, params)
    wrapped = GradSampleModule(model, loss_reduction="mean", batch_first=True)
    optimizer = DPOptimizer(
        torch.optim.SGD(wrapped.parameters(), lr=plan.learning_rate, momentum=plan.momentum),
        noise_multiplier=0.0,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=int(len(y) * plan.sample_rate),
        loss_reduction="mean",
    )
    criterion = torch.nn.CrossEntropyLoss()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(wrapped(torch.from_numpy(x[batch])), torch.from_numpy(y[batch]))
        loss.backward()
        optimizer.step()
    return get_parameters(model)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.activation}")
def test_noise_free_steps_match_opacus(spec: ModelSpec) -> None:
    # Fed the same Poisson batches with σ = 0, the only differences left would
    # be in the per-sample norms, the clipping and the averaging. A small clip
    # norm makes clipping bite on most examples; momentum checks the update.
    x, y = _data()
    plan = FusedPlan(
        learning_rate=0.2,
        momentum=0.9,
        batch_size=24,
        steps=25,
        noise_multiplier=0.0,
        max_grad_norm=0.3,
        private=True,
        secure_mode=False,
        sample_rate=0.1,
    )
    rng = np.random.default_rng(4)
    batches = list(_batches(N, plan, rng))
    start = init_parameters(spec, 1)
    ours, _ = run_steps(spec, start, x, y, batches, plan, rng)
    ref = _opacus_reference(spec, start, x, y, batches, plan)
    assert _max_diff(ours, start) > 1e-2  # it trained
    assert _max_diff(ours, ref) < 1e-5


@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: f"{s.kind}-{s.activation}")
def test_full_batch_noise_free_matches_make_private(spec: ModelSpec) -> None:
    # train_local end to end, fused default against Opacus' make_private with
    # ghost clipping: with q = 1 and σ = 0 both are deterministic clipped GD.
    x, y = _data()
    plan = LocalPlan(
        learning_rate=0.5,
        momentum=0.0,
        batch_size=N,
        steps=10,
        noise_multiplier=0.0,
        max_grad_norm=0.3,
    )
    ours = train_local(spec, init_parameters(spec, 2), x, y, plan, seed=1)
    ref = train_local(
        spec,
        init_parameters(spec, 2),
        x,
        y,
        dataclasses.replace(plan, grad_sample_mode="ghost"),
        seed=1,
    )
    assert _max_diff(ours.params, ref.params) < 1e-5


@pytest.mark.parametrize("secure_mode", [False, True])
def test_noise_has_the_calibrated_std(secure_mode: bool) -> None:
    # Full batch (q = 1): both runs use every example, so the only difference
    # between a noisy and a noise-free step is lr · noise / n.
    spec = SPECS[0]
    x, y = _data()
    sigma, clip, lr = 2.0, 0.5, 1.0
    plan = LocalPlan(
        learning_rate=lr,
        momentum=0.0,
        batch_size=N,
        steps=1,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        secure_mode=secure_mode,
    )
    clean = train_local(
        spec,
        init_parameters(spec, 0),
        x,
        y,
        dataclasses.replace(plan, noise_multiplier=0.0),
        seed=3,
    )
    # 84 weights per draw estimate the std to ±7.7% (1/sqrt(2n)): one draw
    # with a 15% tolerance failed about one run in twenty in secure mode,
    # whose CSPRNG noise cannot be seeded. 30 draws: ±1.4%, checked at 8%.
    draws = [train_local(spec, init_parameters(spec, 0), x, y, plan, seed=3 + i) for i in range(30)]
    diff = np.concatenate(
        [
            (a - b).ravel()
            for noisy in draws
            for a, b in zip(noisy.params, clean.params, strict=True)
        ]
    )
    expected = lr * sigma * clip / N
    assert diff.std() == pytest.approx(expected, rel=0.08)
    assert abs(diff.mean()) < 5 * expected / np.sqrt(diff.size)


def test_secure_mode_is_not_reproducible_from_the_seed() -> None:
    spec = SPECS[0]
    x, y = _data()
    plan = LocalPlan(
        learning_rate=0.1,
        momentum=0.0,
        batch_size=24,
        steps=3,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        secure_mode=True,
    )
    a = train_local(spec, init_parameters(spec, 0), x, y, plan, seed=1)
    b = train_local(spec, init_parameters(spec, 0), x, y, plan, seed=1)
    assert _max_diff(a.params, b.params) > 0


@pytest.mark.parametrize("secure_mode", [False, True])
def test_poisson_batches_have_the_expected_size(secure_mode: bool) -> None:
    n, q, steps = 1000, 0.05, 400
    plan = FusedPlan(
        learning_rate=0.1,
        momentum=0.0,
        batch_size=50,
        steps=steps,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        private=True,
        secure_mode=secure_mode,
        sample_rate=q,
    )
    sizes = [len(b) for b in _batches(n, plan, np.random.default_rng(0))]
    assert len(sizes) == steps
    # Binomial(n, q): mean nq = 50, sd √(nq(1-q)) ≈ 6.9; the mean of 400 draws
    # is within 4 standard errors (≈ 1.4) of 50.
    assert abs(np.mean(sizes) - n * q) < 1.4
    assert np.std(sizes) == pytest.approx(np.sqrt(n * q * (1 - q)), rel=0.2)


def test_non_private_batches_are_shuffled_epochs() -> None:
    plan = FusedPlan(
        learning_rate=0.1,
        momentum=0.0,
        batch_size=30,
        steps=4,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        private=False,
        secure_mode=False,
        sample_rate=30 / 100,
    )
    batches = list(_batches(100, plan, np.random.default_rng(0)))
    assert [len(b) for b in batches] == [30, 30, 30, 10]
    assert sorted(np.concatenate(batches).tolist()) == list(range(100))
    assert np.concatenate(batches).tolist() != list(range(100))


def test_empty_poisson_batches_still_step_with_noise() -> None:
    # q tiny: most batches are empty, yet every step moves the parameters.
    spec = SPECS[0]
    x, y = _data()
    plan = LocalPlan(
        learning_rate=1.0,
        momentum=0.0,
        batch_size=1,
        steps=2,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    result = train_local(spec, init_parameters(spec, 0), x[:2], y[:2], plan, seed=0)
    assert result.steps == 2
    assert _max_diff(result.params, init_parameters(spec, 0)) > 0
