"""Compile a registered model into an HE plan (pure NumPy, no TenSEAL).

A plan is the model rewritten for encrypted evaluation:

- the stored standardisation ``(x - mean) / std`` is folded into the first
  layer (``W' = W / std``, ``b' = b - W' · mean``) so that callers encrypt
  the model's numeric input before standardisation (raw numeric values,
  one-hot categories, missing indicators: :mod:`fedvault.encoding`). The one
  place a caller needs the scaler is an imputed cell: the plaintext gateway
  standardises it to 0, which is the input ``mean``, so the caller encrypts
  that mean (the HE metadata publishes it, see :mod:`secure.he.service`);
- each activation must be a polynomial (CKKS evaluates only additions and
  multiplications); ``square`` costs one multiplicative level. ``quad``
  (``z + α·z²``) is compiled to the same square plan, exactly: since
  ``z + α·z² = α·(z + 1/(2α))² − 1/(4α)``, the first layer's bias is shifted by
  ``1/(2α)``, the second layer's weights are scaled by ``α`` and its bias loses
  ``W2 · 1/(4α)`` (row sums). ReLU is refused
  with an error that names the layer, because any polynomial stand-in would
  silently change the model's predictions;
- ``depth`` counts the rescales one evaluation consumes, which fixes the CKKS
  parameters (:mod:`secure.he.params`).

Classifiers output one logit per class. A regression model has one output,
the target rescaled into [-1, 1] by its public range (what training fits);
the plan leaves it so, because the rescaling back to target units ends in a
clip to that range, which CKKS cannot evaluate: the caller decodes after
decrypting (:meth:`fedvault.encoding.Encoding.decode_target`, the plaintext
gateway's own decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from fedvault.errors import UnsupportedModelError
from fedvault.modelspec import FloatArray, ModelSpec, check_parameters
from fedvault.stats import Scaler

F64 = NDArray[np.float64]
Activation = Literal["square"]


@dataclass(frozen=True, slots=True)
class DenseLayer:
    """``y = weight @ x + bias`` with ``weight`` of shape (out, in), float64."""

    weight: F64
    bias: F64

    @property
    def n_in(self) -> int:
        return int(self.weight.shape[1])

    @property
    def n_out(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True, slots=True)
class HEPlan:
    """Dense layers with a polynomial activation between consecutive ones."""

    layers: tuple[DenseLayer, ...]
    activations: tuple[Activation, ...]  # len(layers) - 1 entries

    @property
    def n_features(self) -> int:
        return self.layers[0].n_in

    @property
    def n_outputs(self) -> int:
        return self.layers[-1].n_out

    @property
    def depth(self) -> int:
        """One rescale per dense layer plus one per square activation."""
        return len(self.layers) + len(self.activations)

    def forward(self, x_raw: NDArray[np.floating]) -> F64:
        """Reference outputs (logits, or a regression's rescaled target) in float64
        for inputs of shape (n, d) before standardisation."""
        h = np.asarray(x_raw, dtype=np.float64)
        for i, layer in enumerate(self.layers):
            h = h @ layer.weight.T + layer.bias
            if i < len(self.activations):
                h = h * h
        return h


def compile_plan(spec: ModelSpec, params: list[FloatArray], scaler: Scaler) -> HEPlan:
    """Rewrite ``spec``/``params``/``scaler`` as an :class:`HEPlan`, or refuse.

    Raises:
        UnsupportedModelError: an activation has no exact polynomial form.
        ConfigError: parameters do not match the spec or the scaler is unusable.
    """
    check_parameters(spec, params)
    if spec.kind == "mlp" and spec.activation not in ("square", "quad"):
        raise UnsupportedModelError(
            f"layer 'activation_1' (after dense layer 1 of {spec.kind}) is {spec.activation!r}, "
            "which CKKS cannot evaluate: only polynomial activations (square, quad) run under "
            "homomorphic encryption; retrain with --activation square (or quad)"
        )
    mean = np.asarray(scaler.mean, dtype=np.float64)
    std = np.asarray(scaler.std, dtype=np.float64)
    if mean.shape != (spec.n_features,) or std.shape != (spec.n_features,):
        raise UnsupportedModelError(
            f"standardisation has shape {mean.shape}/{std.shape}, expected ({spec.n_features},)"
        )
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise UnsupportedModelError("standardisation has a non-finite mean or a non-positive std")
    w1 = np.asarray(params[0], dtype=np.float64) / std
    b1 = np.asarray(params[1], dtype=np.float64) - w1 @ mean
    if spec.kind == "logreg":
        return HEPlan(layers=(DenseLayer(w1, b1),), activations=())
    w2 = np.asarray(params[2], dtype=np.float64)
    b2 = np.asarray(params[3], dtype=np.float64)
    if spec.activation == "quad":
        alpha = spec.alpha()
        b1 = b1 + 1.0 / (2.0 * alpha)
        b2 = b2 - w2.sum(axis=1) / (4.0 * alpha)
        w2 = alpha * w2
    return HEPlan(layers=(DenseLayer(w1, b1), DenseLayer(w2, b2)), activations=("square",))
