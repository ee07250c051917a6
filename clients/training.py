"""Local DP-SGD on a partner node (Opacus).

Privacy mechanics (Abadi et al. 2016, as implemented by Opacus):
- Poisson sampling: each step includes each example independently with
  probability ``q = batch_size / n`` (Opacus' ``DPDataLoader``), which is what
  the RDP accountant's amplification-by-sampling assumes.
- Per-sample gradients clipped to L2 norm ``max_grad_norm``. The default
  ``grad_sample_mode="fused"`` (``clients.fused_dp``) computes per-sample norms
  in closed form in one pass, without materialising per-sample gradients; the
  Opacus modes (``ghost`` clipping with two backward passes, ``hooks``, ``ew``,
  ``functorch``) remain selectable and are the reference the fused path is
  tested against.
- Gaussian noise of std ``noise_multiplier · max_grad_norm`` added to the sum.

The number of steps is fixed per round (not "epochs"), so the accountant sees
exactly ``steps`` compositions at rate ``q``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from clients.fused_dp import FusedPlan, IndexArray, RowSource, train_fused
from clients.rows import EncodedRows
from fedvault.errors import ConfigError
from fedvault.modelspec import FloatArray, ModelSpec
from fedvault.privacy import poisson_sample_rate
from fedvault.stats import Scaler

OPACUS_MODES = frozenset({"ghost", "hooks", "ew", "functorch"})


@dataclass(frozen=True, slots=True)
class LocalPlan:
    """What the coordinator asked this partner to do in one round."""

    learning_rate: float
    momentum: float
    batch_size: int
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    private: bool = True
    secure_mode: bool = False
    grad_sample_mode: str = "fused"


@dataclass(frozen=True, slots=True)
class LocalResult:
    params: list[FloatArray]
    sample_rate: float
    steps: int
    mean_loss: float


@dataclass(frozen=True, slots=True)
class StandardisedRows:
    """A spilled table's rows, standardised as each batch is read (see :mod:`clients.rows`)."""

    rows: EncodedRows
    scaler: Scaler

    def take(self, indices: IndexArray) -> FloatArray:
        return self.scaler.apply(self.rows.take(indices))


def model_input(rows: EncodedRows, scaler: Scaler) -> NDArray[np.float32] | RowSource:
    """What training reads: the standardised table in memory, or batch by batch
    when the table was spilled (standardising it whole would need its size again)."""
    from clients.rows import MemoryRows

    if isinstance(rows, MemoryRows):
        return scaler.apply(rows.array())
    return StandardisedRows(rows, scaler)


def sample_rate(batch_size: int, n: int) -> float:
    """Poisson sampling probability of a step (see :func:`poisson_sample_rate`)."""
    if n < 1:
        raise ConfigError("cannot train on an empty dataset")
    return poisson_sample_rate(batch_size, n)


def train_local(
    spec: ModelSpec,
    params: list[FloatArray],
    x: NDArray[np.float32] | RowSource,
    y: NDArray[np.generic],
    plan: LocalPlan,
    *,
    seed: int | None,
) -> LocalResult:
    """Run ``plan.steps`` (DP-)SGD steps from ``params`` and return new parameters."""
    if plan.grad_sample_mode == "fused":
        q = sample_rate(plan.batch_size, len(y))
        new_params, mean_loss = train_fused(
            spec,
            params,
            x,
            y,
            FusedPlan(
                learning_rate=plan.learning_rate,
                momentum=plan.momentum,
                batch_size=plan.batch_size,
                steps=plan.steps,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm,
                private=plan.private,
                secure_mode=plan.secure_mode,
                sample_rate=q,
            ),
            seed=seed,
        )
        return LocalResult(params=new_params, sample_rate=q, steps=plan.steps, mean_loss=mean_loss)
    if plan.grad_sample_mode not in OPACUS_MODES:
        raise ConfigError(
            f"grad_sample_mode must be 'fused' or one of {sorted(OPACUS_MODES)}, "
            f"got {plan.grad_sample_mode!r}"
        )
    if not isinstance(x, np.ndarray):
        raise ConfigError(
            f"grad_sample_mode {plan.grad_sample_mode!r} needs the table in memory, and this "
            "one was spilled to disk; train it with grad_sample_mode 'fused'"
        )
    # Imported here: torch and Opacus cost ~2 s per ClientApp process, and
    # the default (fused) path needs neither.
    from clients.opacus_training import train_with_opacus

    params_out, steps_done, mean_loss = train_with_opacus(spec, params, x, y, plan, seed=seed)
    return LocalResult(
        params=params_out,
        sample_rate=sample_rate(plan.batch_size, len(y)),
        steps=steps_done,
        mean_loss=mean_loss,
    )
