"""fedvault.modelspec: shapes, init, parameter checks, NumPy forward vs the torch twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.model import build_model, get_parameters, load_parameters
from fedvault.errors import ConfigError
from fedvault.modelspec import (
    FloatArray,
    ModelSpec,
    check_parameters,
    evaluate,
    forward,
    init_parameters,
)

SPECS = [
    ModelSpec(kind="logreg", n_features=64, n_classes=10),
    ModelSpec(kind="mlp", n_features=30, n_classes=2, hidden=16, activation="square"),
    ModelSpec(kind="mlp", n_features=64, n_classes=10, hidden=32, activation="relu"),
    ModelSpec(
        kind="mlp", n_features=64, n_classes=10, hidden=16, activation="quad", quad_alpha=0.3
    ),
]


@pytest.mark.parametrize(
    ("spec", "shapes"),
    [
        (ModelSpec(kind="logreg", n_features=64, n_classes=10), [(10, 64), (10,)]),
        (ModelSpec(kind="logreg", n_features=30, n_classes=2, hidden=7), [(2, 30), (2,)]),
        (
            ModelSpec(kind="mlp", n_features=30, n_classes=2, hidden=7),
            [(7, 30), (7,), (2, 7), (2,)],
        ),
    ],
)
def test_shapes(spec: ModelSpec, shapes: list[tuple[int, ...]]) -> None:
    assert spec.shapes() == shapes
    assert [tuple(p.shape) for p in init_parameters(spec, 0)] == shapes
    torch_shapes = [tuple(p.shape) for p in build_model(spec).parameters()]
    assert torch_shapes == shapes


@pytest.mark.parametrize("spec", SPECS)
def test_init_is_deterministic_per_seed(spec: ModelSpec) -> None:
    a, b, c = init_parameters(spec, 7), init_parameters(spec, 7), init_parameters(spec, 8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == np.float32
    assert any(not np.array_equal(x, z) for x, z in zip(a, c, strict=True))
    check_parameters(spec, a)


def test_init_bounds() -> None:
    spec = ModelSpec(kind="mlp", n_features=25, n_classes=3, hidden=16, activation="relu")
    w1, b1, w2, b2 = init_parameters(spec, 0)
    assert np.abs(w1).max() <= 1 / 5
    assert np.abs(b1).max() <= 1 / 5
    assert np.abs(w2).max() <= 1 / 4
    assert np.abs(b2).max() <= 1 / 4
    square = spec.model_copy(update={"activation": "square"})
    w1s, b1s, w2s, _ = init_parameters(square, 0)
    assert np.abs(w1s).max() <= 0.5 / 5
    assert np.abs(b1s).max() <= 0.5 / 5
    assert np.abs(w2s).max() > 1 / 8  # only the first layer is halved


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="n_classes"):
        ModelSpec(kind="logreg", n_features=4, n_classes=1)
    with pytest.raises(ValueError, match="kind"):
        ModelSpec.model_validate({"kind": "cnn", "n_features": 4, "n_classes": 2})
    with pytest.raises(ValueError, match="extra"):
        ModelSpec.model_validate({"kind": "mlp", "n_features": 4, "n_classes": 2, "depth": 3})
    with pytest.raises(ValueError, match="needs quad_alpha"):
        ModelSpec(kind="mlp", n_features=4, n_classes=2, activation="quad")
    with pytest.raises(ValueError, match="only to an mlp with activation 'quad'"):
        ModelSpec(kind="mlp", n_features=4, n_classes=2, activation="square", quad_alpha=0.5)
    with pytest.raises(ValueError, match="quad_alpha"):
        ModelSpec(kind="mlp", n_features=4, n_classes=2, activation="quad", quad_alpha=0.0)


def test_quad_activation_is_z_plus_alpha_z_squared() -> None:
    spec = ModelSpec(
        kind="mlp", n_features=3, n_classes=2, hidden=1, activation="quad", quad_alpha=0.25
    )
    params: list[FloatArray] = [
        np.array([[1.0, 0.0, 0.0]], np.float32),
        np.zeros(1, np.float32),
        np.array([[1.0], [0.0]], np.float32),
        np.zeros(2, np.float32),
    ]
    x: FloatArray = np.array([[-2.0, 5.0, 5.0], [0.0, 1.0, 1.0], [4.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(forward(spec, params, x)[:, 0], [-1.0, 0.0, 8.0])


@pytest.mark.parametrize("spec", SPECS)
def test_check_parameters_rejects_wrong_shapes(spec: ModelSpec) -> None:
    params = init_parameters(spec, 0)
    with pytest.raises(ConfigError, match="shapes"):
        check_parameters(spec, params[:-1])
    with pytest.raises(ConfigError, match="shapes"):
        check_parameters(spec, [*params, np.zeros(1, np.float32)])
    with pytest.raises(ConfigError, match="shapes"):
        check_parameters(spec, [params[0].T, *params[1:]])
    with pytest.raises(ConfigError, match="shapes"):
        check_parameters(spec, [*params[:-1], params[-1][None, :]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layer", [0, -1])
def test_check_parameters_rejects_non_finite(bad: float, layer: int) -> None:
    spec = SPECS[1]
    params = init_parameters(spec, 0)
    params[layer] = params[layer].copy()
    params[layer].flat[0] = bad
    with pytest.raises(ConfigError, match="NaN or infinity"):
        check_parameters(spec, params)


@pytest.mark.parametrize("spec", SPECS)
def test_numpy_forward_matches_torch(spec: ModelSpec) -> None:
    rng = np.random.default_rng(3)
    params = init_parameters(spec, 5)
    x: FloatArray = rng.normal(size=(50, spec.n_features)).astype(np.float32)
    model = build_model(spec)
    load_parameters(model, params)
    for got, want in zip(get_parameters(model), params, strict=True):
        np.testing.assert_array_equal(got, want)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    logits = forward(spec, params, x)
    assert logits.dtype == np.float32
    assert logits.shape == (50, spec.n_classes)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_evaluate_perfect_logits() -> None:
    k = 4
    spec = ModelSpec(kind="logreg", n_features=k, n_classes=k)
    params: list[FloatArray] = [np.eye(k, dtype=np.float32), np.zeros(k, dtype=np.float32)]
    y = np.array([0, 3, 1, 2, 2, 0], dtype=np.int64)
    x: FloatArray = np.eye(k, dtype=np.float32)[y]
    loss, accuracy = evaluate(spec, params, x, y)
    assert accuracy == 1.0
    assert loss == pytest.approx(-np.log(np.e / (np.e + k - 1)), rel=1e-6)
    # Shifting the labels makes every prediction wrong.
    loss_wrong, accuracy_wrong = evaluate(spec, params, x, (y + 1) % k)
    assert accuracy_wrong == 0.0
    assert loss_wrong == pytest.approx(-np.log(1 / (np.e + k - 1)), rel=1e-6)


def test_evaluate_is_stable_for_huge_logits() -> None:
    spec = ModelSpec(kind="logreg", n_features=2, n_classes=2)
    params: list[FloatArray] = [
        np.array([[1e4, 0.0], [0.0, 1e4]], dtype=np.float32),
        np.zeros(2, dtype=np.float32),
    ]
    x: FloatArray = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    loss, accuracy = evaluate(spec, params, x, np.array([0, 0], dtype=np.int64))
    assert accuracy == 0.5
    assert np.isfinite(loss)
    assert loss == pytest.approx(5e3, rel=1e-6)


def test_evaluate_empty() -> None:
    spec = SPECS[0]
    empty: FloatArray = np.zeros((0, spec.n_features), dtype=np.float32)
    assert evaluate(spec, init_parameters(spec, 0), empty, np.zeros(0, np.int64)) == (0.0, 0.0)
