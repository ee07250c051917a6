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

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.fused_dp import FusedPlan, train_fused
from clients.model import build_model, get_parameters, load_parameters
from fedvault.errors import ConfigError
from fedvault.modelspec import FloatArray, ModelSpec
from fedvault.privacy import poisson_sample_rate

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


def sample_rate(batch_size: int, n: int) -> float:
    """Poisson sampling probability of a step (see :func:`poisson_sample_rate`)."""
    if n < 1:
        raise ConfigError("cannot train on an empty dataset")
    return poisson_sample_rate(batch_size, n)


def _generator(seed: int | None, secure_mode: bool) -> torch.Generator:
    # In secure mode the seed comes from the OS CSPRNG, so nobody (including
    # this node's operator replaying a run) can predict the noise.
    g = torch.Generator()
    if secure_mode or seed is None:
        g.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    else:
        g.manual_seed(seed)
    return g


def train_local(
    spec: ModelSpec,
    params: list[FloatArray],
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    plan: LocalPlan,
    *,
    seed: int | None,
) -> LocalResult:
    """Run ``plan.steps`` (DP-)SGD steps from ``params`` and return new parameters."""
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
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
            sampling_generator=_generator(seed, plan.secure_mode),
            noise_generator=_generator(None if seed is None else seed + 1, plan.secure_mode),
        )
        return LocalResult(params=new_params, sample_rate=q, steps=plan.steps, mean_loss=mean_loss)
    if plan.grad_sample_mode not in OPACUS_MODES:
        raise ConfigError(
            f"grad_sample_mode must be 'fused' or one of {sorted(OPACUS_MODES)}, "
            f"got {plan.grad_sample_mode!r}"
        )
    model = build_model(spec)
    load_parameters(model, params)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    q = sample_rate(plan.batch_size, len(dataset))
    loader = DataLoader(
        dataset,
        # Opacus samples at 1 / len(loader) = 1 / ceil(n / B): the rate charged.
        batch_size=min(plan.batch_size, len(dataset)),
        shuffle=True,
        generator=_generator(seed, plan.secure_mode),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.learning_rate, momentum=plan.momentum)
    criterion: nn.Module = nn.CrossEntropyLoss()
    if plan.private:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure-mode advice; we handle seeding
            wrapped = engine.make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm,
                poisson_sampling=True,
                noise_generator=_generator(None if seed is None else seed + 1, plan.secure_mode),
                grad_sample_mode=plan.grad_sample_mode,
            )
        # Ghost clipping also wraps the criterion (two backward passes).
        if len(wrapped) == 4:
            model, optimizer, criterion, loader = wrapped
        else:
            model, optimizer, loader = wrapped
    model.train()
    losses: list[float] = []
    done = 0
    while done < plan.steps:
        for xb, yb in loader:
            if done >= plan.steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if len(yb) == 0:
                # An empty Poisson batch is still a step: the noise-only update
                # is what the accountant charged for.
                if plan.private:
                    optimizer.step()
                done += 1
                continue
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            done += 1
    if plan.private:
        model = model._module  # type: ignore[assignment]  # unwrap GradSampleModule
    return LocalResult(
        params=get_parameters(model),
        sample_rate=q,
        steps=done,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
    )
