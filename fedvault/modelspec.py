"""Model architectures as data, with a NumPy forward pass.

The coordinator, the registry and the HE compiler need the model's maths but
not torch (a partner's ClientApp builds the torch twin in ``clients.model``).
Parameters travel as an ordered list of arrays in PyTorch layout
(``weight`` is ``(out, in)``), the order of ``nn.Module.parameters()``.

Kinds:
- ``logreg``: softmax regression, ``logits = W x + b`` (k outputs, k = classes;
  for 2 classes this is logistic regression with a redundant logit, kept so every
  model has one logit per class); for a regression task, linear regression
  (one output, the target rescaled into [-1, 1] by its public range).
- ``mlp``: ``W2 act(W1 x + b1) + b2`` where ``act`` is ``square`` (z², evaluable
  under CKKS with one multiplication), ``quad`` (``z + α·z²`` with ``α =
  quad_alpha``: near-linear at the start of training, so better conditioned
  under DP noise than a pure square, and still one CKKS multiplication, see
  :mod:`secure.he.plan`) or ``relu`` (plaintext only).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedvault.errors import ConfigError

FloatArray = NDArray[np.float32]


class ModelSpec(BaseModel):
    """Architecture of a model: enough to rebuild it anywhere."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["logreg", "mlp"]
    n_features: int = Field(ge=1)
    # Outputs: one logit per class, or 1 for regression.
    n_classes: int = Field(ge=1)
    task: Literal["classification", "regression"] = "classification"
    # cross-entropy for classification; squared or huber (on the rescaled
    # target, threshold huber_delta) for regression.
    loss: Literal["cross-entropy", "squared", "huber"] = "cross-entropy"
    huber_delta: float = Field(default=0.1, gt=0, le=2)
    hidden: int = Field(default=32, ge=1)
    activation: Literal["square", "relu", "quad"] = "square"
    quad_alpha: float | None = Field(default=None, gt=0, le=100)

    @model_validator(mode="after")
    def _task_shape(self) -> ModelSpec:
        if self.task == "classification":
            if self.n_classes < 2:
                raise ValueError("a classifier needs at least 2 classes")
            if self.loss != "cross-entropy":
                raise ValueError("a classifier is trained with loss 'cross-entropy'")
        else:
            if self.n_classes != 1:
                raise ValueError("a regression model has exactly one output (n_classes = 1)")
            if self.loss == "cross-entropy":
                raise ValueError("a regression model is trained with loss 'squared' or 'huber'")
        return self

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    @model_validator(mode="after")
    def _quad_alpha_iff_quad(self) -> ModelSpec:
        if self.kind == "mlp" and self.activation == "quad" and self.quad_alpha is None:
            raise ValueError("activation 'quad' needs quad_alpha (the α of z + α·z²)")
        if self.quad_alpha is not None and (self.kind != "mlp" or self.activation != "quad"):
            raise ValueError("quad_alpha applies only to an mlp with activation 'quad'")
        return self

    def alpha(self) -> float:
        """The α of the ``quad`` activation ``z + α·z²`` (ConfigError for other activations)."""
        if self.quad_alpha is None:
            raise ConfigError(f"activation {self.activation!r} has no quad_alpha")
        return self.quad_alpha

    def shapes(self) -> list[tuple[int, ...]]:
        d, k, h = self.n_features, self.n_classes, self.hidden
        if self.kind == "logreg":
            return [(k, d), (k,)]
        return [(h, d), (h,), (k, h), (k,)]


def init_parameters(spec: ModelSpec, seed: int) -> list[FloatArray]:
    """PyTorch-default-like uniform(±1/sqrt(fan_in)) init, from a seed.

    The square activation grows fast; halving the first layer's scale keeps the
    first rounds of DP-SGD out of the loss blow-up region.
    """
    rng = np.random.default_rng(seed)
    params: list[FloatArray] = []
    for i, shape in enumerate(spec.shapes()):
        fan_in = shape[1] if len(shape) == 2 else spec.shapes()[i - 1][1]
        bound = 1.0 / np.sqrt(fan_in)
        if spec.kind == "mlp" and spec.activation == "square" and i < 2:
            bound *= 0.5
        params.append(rng.uniform(-bound, bound, size=shape).astype(np.float32))
    return params


def check_parameters(spec: ModelSpec, params: list[FloatArray]) -> None:
    """Refuse parameters whose shapes do not match ``spec`` (or are not finite)."""
    expected = spec.shapes()
    got = [tuple(p.shape) for p in params]
    if got != expected:
        raise ConfigError(f"model parameters have shapes {got}, expected {expected}")
    if not all(np.isfinite(p).all() for p in params):
        raise ConfigError("model parameters contain NaN or infinity")


def forward(spec: ModelSpec, params: list[FloatArray], x: FloatArray) -> FloatArray:
    """Logits for a batch ``x`` of shape (n, d) (standardised features)."""
    if spec.kind == "logreg":
        w, b = params
        return (x @ w.T + b).astype(np.float32)
    w1, b1, w2, b2 = params
    z = x @ w1.T + b1
    return (activate(spec, z) @ w2.T + b2).astype(np.float32)


def activate(spec: ModelSpec, z: FloatArray) -> FloatArray:
    """The hidden activation of an ``mlp`` applied to pre-activations ``z``."""
    if spec.activation == "square":
        return z * z
    if spec.activation == "quad":
        return z + np.float32(spec.alpha()) * (z * z)
    return np.maximum(z, 0)


def regression_loss(spec: ModelSpec, residual: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per-example loss of residuals ``prediction − target`` (rescaled units)."""
    if spec.loss == "huber":
        a = np.abs(residual)
        d = spec.huber_delta
        return np.where(a <= d, 0.5 * residual**2, d * (a - 0.5 * d))
    return 0.5 * residual**2


def evaluate(
    spec: ModelSpec, params: list[FloatArray], x: FloatArray, y: NDArray[np.generic]
) -> tuple[float, float]:
    """Mean loss and accuracy (classification) or R² on rescaled targets (regression)
    of ``params`` on standardised ``x``."""
    if len(y) == 0:
        return 0.0, 0.0
    if spec.is_regression:
        target = np.asarray(y, dtype=np.float64)
        pred = forward(spec, params, x)[:, 0].astype(np.float64)
        residual = pred - target
        spread = float(((target - target.mean()) ** 2).sum())
        r2 = 1.0 - float((residual**2).sum()) / spread if spread > 0 else 0.0
        return float(regression_loss(spec, residual).mean()), r2
    logits = forward(spec, params, x).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    accuracy = float((logits.argmax(axis=1) == y).mean())
    return loss, accuracy
