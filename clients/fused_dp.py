"""One-pass DP-SGD for fedvault's models (Linear layers + one elementwise activation).

Why not Opacus' own clipping here: for a Linear layer fed 2-D inputs the
per-sample gradient is the outer product ``g_i a_iᵀ`` of the layer's output
gradient and its input, so its norm is ``‖g_i‖·‖(a_i, 1)‖`` and the clipped sum
is ``(c ⊙ G)ᵀ A`` — no per-sample gradient needs to exist and no second backward
pass is needed (the "book-keeping" trick of Bu et al., 2023). Opacus' ghost
clipping computes the same norms but runs two backward passes through hooks,
and its hook and data-loader machinery dominate the step time of models this
small (``bench/dp_overhead.py``: 13–18× a non-private step here). Our models
are exactly this shape (softmax regression, or Linear → square/quad/ReLU → Linear),
so the output gradients have a closed form and a step is a handful of NumPy
operations. NumPy rather than torch also keeps torch's ~1.5 s import out of
every ClientApp process (Flower starts one per message).

What stays Opacus' semantics, so the privacy analysis is the one its
accountant assumes: Poisson sampling (as Opacus' ``UniformWithReplacementSampler``
draws it: each example in a step independently with probability ``q``,
``int(1/q)`` steps per epoch), the clip factor ``min(1, C / (‖g_i‖ + 1e-6))``,
Gaussian noise of std ``σ·C`` on the clipped sum, and division by the expected
batch size ``int(n·q)`` (``loss_reduction="mean"``). ``tests/test_fused_dp.py``
checks that, fed the same batches without noise, a run follows Opacus'
``GradSampleModule`` + ``DPOptimizer`` step for step. In ``secure_mode``
sampling and noise come from the OS CSPRNG (:mod:`secure.csprng`), with Opacus'
floating-point hardening; otherwise from a seeded PCG64 generator
(reproducible, hence predictable to whoever knows the seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from fedvault.modelspec import FloatArray, ModelSpec
from secure import csprng

CLIP_EPSILON = 1e-6  # Opacus' guard in the clip factor (DPOptimizer.clip_and_accumulate)
IndexArray = NDArray[np.intp]
_LOGIT_FLOOR = np.float32(-69.0)


class RowSource(Protocol):
    """Model input rows gathered by index: a table too large for memory
    (:mod:`clients.rows`), standardised batch by batch."""

    def take(self, indices: IndexArray) -> FloatArray: ...


@dataclass(frozen=True, slots=True)
class FusedPlan:
    learning_rate: float
    momentum: float
    batch_size: int
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    private: bool
    secure_mode: bool
    sample_rate: float


class _FlatModel:
    """Parameters (and gradient) as views into one flat array each.

    One flat buffer lets noise and the SGD update be one operation each instead
    of one per parameter.
    """

    def __init__(self, spec: ModelSpec, params: list[FloatArray]) -> None:
        self.spec = spec
        self.flat = np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in params])
        self.grad = np.zeros_like(self.flat)
        self.params: list[FloatArray] = []
        self.grads: list[FloatArray] = []
        offset = 0
        for p in params:
            size = int(np.prod(p.shape))
            self.params.append(self.flat[offset : offset + size].reshape(p.shape))
            self.grads.append(self.grad[offset : offset + size].reshape(p.shape))
            offset += size

    def output_grad(self, z: FloatArray, y: NDArray[np.generic]) -> tuple[FloatArray, float]:
        """Per-sample gradients of the loss w.r.t. the outputs, and the summed loss."""
        if self.spec.is_regression:
            return _regression_grad(z, y, self.spec.loss, self.spec.huber_delta)
        return _cross_entropy_grad(z, y)  # type: ignore[arg-type]

    def accumulate(
        self,
        x: FloatArray,
        y: NDArray[np.generic],
        x_norm_sq: FloatArray | None,
        max_grad_norm: float,
    ) -> float:
        """Add the sum of (clipped) per-sample gradients of a batch to ``self.grad``.

        ``x_norm_sq`` holds ``‖x_i‖² + 1`` per example when clipping, ``None``
        for no clipping. Returns the batch's summed cross-entropy.
        """
        if self.spec.kind == "logreg":
            w, b = self.params
            g, loss = self.output_grad(x @ w.T + b, y)
            if x_norm_sq is not None:
                sq = np.vecdot(g, g)
                sq *= x_norm_sq
                g *= _clip_factor(sq, max_grad_norm)
            gw, gb = self.grads
            gw += g.T @ x
            gb += g.sum(0)
            return loss
        w1, b1, w2, b2 = self.params
        z1 = x @ w1.T + b1
        if self.spec.activation == "square":
            a1 = z1 * z1
            slope = z1
            slope *= 2.0
        elif self.spec.activation == "quad":  # z + αz², slope 1 + 2αz
            alpha = np.float32(self.spec.alpha())
            a1 = z1 * z1
            a1 *= alpha
            a1 += z1
            slope = z1
            slope *= 2.0 * alpha
            slope += 1.0
        else:
            a1 = np.maximum(z1, 0.0)
            slope = (z1 > 0).astype(np.float32)
        g2, loss = self.output_grad(a1 @ w2.T + b2, y)
        g1 = g2 @ w2
        g1 *= slope
        if x_norm_sq is not None:
            sq = np.vecdot(g2, g2) * (np.vecdot(a1, a1) + 1.0)
            sq += np.vecdot(g1, g1) * x_norm_sq
            c = _clip_factor(sq, max_grad_norm)
            g1 *= c
            g2 *= c
        gw1, gb1, gw2, gb2 = self.grads
        gw1 += g1.T @ x
        gb1 += g1.sum(0)
        gw2 += g2.T @ a1
        gb2 += g2.sum(0)
        return loss


def _regression_grad(
    z: FloatArray, y: NDArray[np.generic], loss: str, delta: float
) -> tuple[FloatArray, float]:
    """Per-sample gradients of ½(z − y)² (or Huber) w.r.t. the single output, and the sum."""
    residual = z[:, 0] - np.asarray(y, dtype=np.float32)
    if loss == "huber":
        a = np.abs(residual)
        total = float(np.where(a <= delta, 0.5 * residual**2, delta * (a - 0.5 * delta)).sum())
        g = np.clip(residual, -delta, delta)
    else:
        total = float(0.5 * (residual.astype(np.float64) ** 2).sum())
        g = residual
    return g[:, None].astype(np.float32), total


def _cross_entropy_grad(z: FloatArray, y: NDArray[np.int64]) -> tuple[FloatArray, float]:
    """Per-sample gradients of cross-entropy w.r.t. the logits, and the summed loss."""
    z -= z.max(axis=1, keepdims=True)
    # Probabilities below e^-69 ≈ 1e-30 are 0 to float32 arithmetic anyway;
    # flooring there keeps exp() and the products after it out of subnormal
    # floats, which run ~100× slower on x86 once a model's logits spread.
    np.maximum(z, _LOGIT_FLOOR, out=z)
    g = np.exp(z)
    norm = g.sum(axis=1, keepdims=True)
    g /= norm
    rows = np.arange(len(y))
    loss = float(np.log(norm).sum() - z[rows, y].sum())
    g[rows, y] -= 1.0
    return g, loss


def _clip_factor(squared_norms: FloatArray, max_grad_norm: float) -> FloatArray:
    """Opacus' per-sample clip factor, as a column to scale rows by."""
    np.sqrt(squared_norms, out=squared_norms)
    squared_norms += CLIP_EPSILON
    factor: FloatArray = np.minimum(max_grad_norm / squared_norms, 1.0).astype(np.float32)
    return factor[:, None]


def train_fused(
    spec: ModelSpec,
    params: list[FloatArray],
    x: NDArray[np.float32] | RowSource,
    y: NDArray[np.generic],
    plan: FusedPlan,
    *,
    seed: int | None,
) -> tuple[list[FloatArray], float]:
    """Run ``plan.steps`` SGD steps; returns (parameters, mean training loss).

    Private: Poisson batches at ``plan.sample_rate``, clipped sums plus noise,
    divided by the expected batch size. Non-private: shuffled mini-batches of
    ``plan.batch_size`` (epochs, as a ``DataLoader`` with ``shuffle=True``
    would) and the mean gradient. ``seed=None`` or ``secure_mode`` draw fresh
    randomness. The mean loss (over the examples the steps used, before each
    update) stays on the node: it is not differentially private.
    """
    rng = np.random.default_rng(None if plan.secure_mode else seed)
    batches = _batches(len(y), plan, rng)
    return run_steps(spec, params, x, y, batches, plan, rng)


def run_steps(
    spec: ModelSpec,
    params: list[FloatArray],
    x_in: NDArray[np.float32] | RowSource,
    y_in: NDArray[np.generic],
    batches: Iterable[IndexArray],
    plan: FusedPlan,
    rng: np.random.Generator,
) -> tuple[list[FloatArray], float]:
    """One SGD step per batch of indices (the core, separate so tests can fix batches).

    ``x_in`` is the whole input in memory, or a :class:`RowSource` that
    reads each batch's rows (a spilled table: only the batch is in memory).
    """
    model = _FlatModel(spec, params)
    x_norm_sq: FloatArray | None = None
    gather: Callable[[IndexArray], FloatArray]
    if isinstance(x_in, np.ndarray):
        x = np.ascontiguousarray(x_in, dtype=np.float32)
        gather = x.__getitem__
        # ‖(x_i, 1)‖² is fixed per example: computed once, not once per step.
        if plan.private:
            x_norm_sq = np.vecdot(x, x) + np.float32(1.0)
    else:
        gather = x_in.take
    y = np.ascontiguousarray(y_in, dtype=np.float32 if spec.is_regression else np.int64)
    velocity = np.zeros_like(model.flat) if plan.momentum else None
    noise_std = plan.noise_multiplier * plan.max_grad_norm
    expected_batch = int(len(y) * plan.sample_rate)
    total_loss = 0.0
    seen = 0
    for batch in batches:
        size = len(batch)
        if plan.private:
            # The noise goes in first; the clipped sums are added onto it.
            if plan.secure_mode:
                model.grad[:] = csprng.hardened_normal(noise_std, model.grad.size)
            else:
                rng.standard_normal(dtype=np.float32, out=model.grad)
                model.grad *= noise_std
            denominator = expected_batch
        elif size:
            model.grad.fill(0.0)
            denominator = size
        else:
            continue
        if size:
            xb = gather(batch)
            norms: FloatArray | None = None
            if x_norm_sq is not None:
                norms = x_norm_sq[batch]
            elif plan.private:
                norms = np.vecdot(xb, xb) + np.float32(1.0)
            total_loss += model.accumulate(xb, y[batch], norms, plan.max_grad_norm)
            seen += size
        # An empty Poisson batch is still a step: the noise-only update is what
        # the accountant charged for.
        if velocity is not None:
            velocity *= plan.momentum
            velocity += model.grad / np.float32(denominator)
            model.flat -= np.float32(plan.learning_rate) * velocity
        else:
            model.flat -= np.float32(plan.learning_rate / denominator) * model.grad
    mean_loss = total_loss / seen if seen else math.nan
    return [p.copy() for p in model.params], mean_loss


def _batches(n: int, plan: FusedPlan, rng: np.random.Generator) -> Iterator[IndexArray]:
    """Index arrays of ``plan.steps`` batches: Poisson when private, else shuffled epochs."""
    done = 0
    while True:
        epoch: Iterable[IndexArray]
        if plan.private:
            uniforms = csprng.uniform if plan.secure_mode else rng.random
            epoch = (
                np.flatnonzero(uniforms(n) < plan.sample_rate)
                for _ in range(max(1, int(1 / plan.sample_rate)))
            )
        else:
            perm = rng.permutation(n)
            epoch = np.array_split(perm, range(plan.batch_size, n, plan.batch_size))
        for batch in epoch:
            if done >= plan.steps:
                return
            yield batch
            done += 1
