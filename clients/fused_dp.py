"""One-pass DP-SGD for fedvault's models (Linear layers + one elementwise activation).

Why not Opacus' own clipping here: for a Linear layer fed 2-D inputs the
per-sample gradient is the outer product ``g_i a_iᵀ`` of the layer's output
gradient and its input, so its norm is ``‖g_i‖·‖(a_i, 1)‖`` and the clipped sum
is ``(c ⊙ G)ᵀ A`` — no per-sample gradient needs to exist and no second backward
pass is needed (the "book-keeping" trick of Bu et al., 2023). Opacus' ghost
clipping computes the same norms but runs two backward passes through hooks,
and its hook and data-loader machinery dominate the step time of models this
small (``bench/dp_overhead.py``: 13–18× a non-private step here). Our models
are exactly this shape (softmax regression, or Linear → square/ReLU → Linear),
so the output gradients have a closed form too and a step is a handful of
tensor operations.

What stays Opacus' semantics, so the privacy analysis is the one its
accountant assumes: Poisson sampling (the draw of Opacus'
``UniformWithReplacementSampler``: each example in a step independently with
probability ``q``), the clip factor ``min(1, C / (‖g_i‖ + 1e-6))``, Gaussian
noise of std ``σ·C`` on the clipped sum, and division by the expected batch
size ``int(n·q)`` (``loss_reduction="mean"``). ``tests/test_fused_dp.py``
checks that a noise-free run follows Opacus' trajectory step for step, from the
same seed. In ``secure_mode`` sampling and noise come from the OS CSPRNG
(:mod:`secure.csprng`), with Opacus' floating-point hardening.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from fedvault.modelspec import FloatArray, ModelSpec
from secure import csprng

CLIP_EPSILON = 1e-6  # Opacus' guard in the clip factor (DPOptimizer.clip_and_accumulate)


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
    """Parameters (and gradient) as views into one flat tensor each.

    One flat buffer lets noise and the SGD update be one tensor operation each
    instead of one per parameter.
    """

    def __init__(self, spec: ModelSpec, params: list[FloatArray]) -> None:
        self.spec = spec
        self.flat = torch.from_numpy(
            np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in params])
        )
        self.grad = torch.zeros_like(self.flat)
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        offset = 0
        for p in params:
            size = int(np.prod(p.shape))
            self.params.append(self.flat[offset : offset + size].view(p.shape))
            self.grads.append(self.grad[offset : offset + size].view(p.shape))
            offset += size

    def numpy_params(self) -> list[FloatArray]:
        return [p.numpy().copy() for p in self.params]

    def accumulate(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_norm_sq: torch.Tensor | None,
        max_grad_norm: float,
    ) -> torch.Tensor:
        """Add the sum of (clipped) per-sample gradients of a batch to ``self.grad``.

        ``x_norm_sq`` holds ``‖x_i‖² + 1`` per example when clipping, ``None``
        for no clipping. Returns the batch's summed cross-entropy as a 0-d
        tensor (no host sync per step).
        """
        if self.spec.kind == "logreg":
            w, b = self.params
            g, loss = _cross_entropy_grad(torch.addmm(b, x, w.t()), y)
            if x_norm_sq is not None:
                sq = torch.linalg.vecdot(g, g).mul_(x_norm_sq)
                g.mul_(_clip_factor(sq, max_grad_norm))
            gw, gb = self.grads
            gw.addmm_(g.t(), x)
            gb.add_(g.sum(0))
            return loss
        w1, b1, w2, b2 = self.params
        z1 = torch.addmm(b1, x, w1.t())
        if self.spec.activation == "square":
            a1 = z1 * z1
            slope = z1.mul_(2.0)
        else:
            a1 = torch.relu(z1)
            slope = (z1 > 0).to(z1.dtype)
        g2, loss = _cross_entropy_grad(torch.addmm(b2, a1, w2.t()), y)
        g1 = torch.mm(g2, w2).mul_(slope)
        if x_norm_sq is not None:
            sq = torch.linalg.vecdot(g2, g2) * (torch.linalg.vecdot(a1, a1) + 1.0)
            sq.addcmul_(torch.linalg.vecdot(g1, g1), x_norm_sq)
            c = _clip_factor(sq, max_grad_norm)
            g1.mul_(c)
            g2.mul_(c)
        gw1, gb1, gw2, gb2 = self.grads
        gw1.addmm_(g1.t(), x)
        gb1.add_(g1.sum(0))
        gw2.addmm_(g2.t(), a1)
        gb2.add_(g2.sum(0))
        return loss


def _cross_entropy_grad(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of cross-entropy w.r.t. the logits, and the summed loss."""
    log_p = torch.log_softmax(z, dim=1)
    loss = torch.nn.functional.nll_loss(log_p, y, reduction="sum")
    g = log_p.exp_()
    g[torch.arange(len(y)), y] -= 1.0
    return g, loss


def _clip_factor(squared_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus' per-sample clip factor, as a column to scale rows by."""
    return (max_grad_norm / squared_norms.sqrt_().add_(CLIP_EPSILON)).clamp_(max=1.0).unsqueeze_(1)


def train_fused(
    spec: ModelSpec,
    params: list[FloatArray],
    x_np: NDArray[np.float32],
    y_np: NDArray[np.int64],
    plan: FusedPlan,
    *,
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
) -> tuple[list[FloatArray], float]:
    """Run ``plan.steps`` SGD steps; returns (parameters, mean training loss).

    Private: Poisson batches at ``plan.sample_rate``, clipped sums plus noise,
    divided by the expected batch size. Non-private: shuffled mini-batches of
    ``plan.batch_size`` (epochs, as a ``DataLoader`` with ``shuffle=True``
    would) and the mean gradient. The mean loss is over the examples the steps
    used, before each update; it stays on the node (it is not DP).
    """
    model = _FlatModel(spec, params)
    x = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(y_np, dtype=np.int64))
    n = len(y)
    # ‖(x_i, 1)‖² is fixed per example: computed once, not once per step.
    x_norm_sq = torch.linalg.vecdot(x, x).add_(1.0) if plan.private else None
    velocity = torch.zeros_like(model.flat) if plan.momentum else None
    noise_std = plan.noise_multiplier * plan.max_grad_norm
    expected_batch = int(n * plan.sample_rate)
    total_loss = torch.zeros((), dtype=torch.float64)
    seen = 0
    with torch.no_grad():
        for batch in _batches(n, plan, sampling_generator):
            size = len(batch)
            if plan.private:
                # The noise goes in first; the clipped sums are added onto it.
                if plan.secure_mode:
                    model.grad.copy_(
                        torch.from_numpy(csprng.hardened_normal(noise_std, model.grad.numel()))
                    )
                else:
                    model.grad.normal_(0.0, noise_std, generator=noise_generator)
                denominator = expected_batch
            elif size:
                model.grad.zero_()
                denominator = size
            else:
                continue
            if size:
                xb, yb = x.index_select(0, batch), y.index_select(0, batch)
                norms = None if x_norm_sq is None else x_norm_sq.index_select(0, batch)
                total_loss += model.accumulate(xb, yb, norms, plan.max_grad_norm)
                seen += size
            # An empty Poisson batch is still a step: the noise-only update is
            # what the accountant charged for.
            if velocity is not None:
                velocity.mul_(plan.momentum).add_(model.grad, alpha=1.0 / denominator)
                model.flat.sub_(velocity, alpha=plan.learning_rate)
            else:
                model.flat.sub_(model.grad, alpha=plan.learning_rate / denominator)
    mean_loss = float(total_loss) / seen if seen else math.nan
    return model.numpy_params(), mean_loss


def _batches(n: int, plan: FusedPlan, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of ``plan.steps`` batches: Poisson when private, else shuffled.

    Private batches are drawn as Opacus' ``UniformWithReplacementSampler``
    draws them (``rand(n) < q`` per step, ``int(1/q)`` steps per epoch), and a
    ``DataLoader``'s per-epoch base-seed draw is mirrored, so the same seed
    gives the same batches as Opacus.
    """
    done = 0
    per_epoch = max(1, int(1 / plan.sample_rate))
    while done < plan.steps:
        if plan.private and plan.secure_mode:
            epoch: list[torch.Tensor] | Iterator[torch.Tensor] = (
                torch.from_numpy(np.flatnonzero(csprng.uniform(n) < plan.sample_rate))
                for _ in range(per_epoch)
            )
        elif plan.private:
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            epoch = (
                (torch.rand(n, generator=generator) < plan.sample_rate).nonzero().view(-1)
                for _ in range(per_epoch)
            )
        else:
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            epoch = list(
                torch.split(torch.randperm(n, generator=generator), min(plan.batch_size, n))
            )
        for batch in epoch:
            if done >= plan.steps:
                return
            yield batch
            done += 1
