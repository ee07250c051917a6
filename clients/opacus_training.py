"""DP-SGD through Opacus' own machinery (``make_private``), the reference path.

fedvault trains with :mod:`clients.fused_dp` by default; this path runs the same
plan through Opacus' ``GradSampleModule`` (``ghost``, ``hooks``, ``ew`` or
``functorch`` grad-sample modes), ``DPDataLoader`` and ``DPOptimizer``. It is
what the fused path is tested against and what ``bench/dp_overhead.py`` times
beside it.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.model import build_model, get_parameters, load_parameters
from fedvault.modelspec import FloatArray, ModelSpec

if TYPE_CHECKING:
    from clients.training import LocalPlan


def _generator(seed: int | None, secure_mode: bool) -> torch.Generator:
    # In secure mode the seed comes from the OS CSPRNG, so nobody (including
    # this node's operator replaying a run) can predict the noise.
    g = torch.Generator()
    if secure_mode or seed is None:
        g.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    else:
        g.manual_seed(seed)
    return g


def train_with_opacus(
    spec: ModelSpec,
    params: list[FloatArray],
    x: NDArray[np.float32],
    y: NDArray[np.generic],
    plan: LocalPlan,
    *,
    seed: int | None,
) -> tuple[list[FloatArray], int, float]:
    """Run the plan with Opacus; returns (parameters, steps done, mean batch loss)."""
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    model = build_model(spec)
    load_parameters(model, params)
    if spec.is_regression:
        # Targets as (n, 1) like the model's output. torch's MSELoss is (z − y)²,
        # twice the fused path's ½(z − y)²: the same minimiser, a doubled step.
        targets = torch.from_numpy(np.asarray(y, dtype=np.float32).reshape(-1, 1))
    else:
        targets = torch.from_numpy(np.asarray(y, dtype=np.int64))
    dataset = TensorDataset(torch.from_numpy(x), targets)
    loader = DataLoader(
        dataset,
        # Opacus samples at 1 / len(loader) = 1 / ceil(n / B): the rate charged.
        batch_size=min(plan.batch_size, len(dataset)),
        shuffle=True,
        generator=_generator(seed, plan.secure_mode),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.learning_rate, momentum=plan.momentum)
    criterion: nn.Module
    if not spec.is_regression:
        criterion = nn.CrossEntropyLoss()
    elif spec.loss == "huber":
        criterion = nn.HuberLoss(delta=spec.huber_delta)
    else:
        criterion = nn.MSELoss()
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
    return get_parameters(model), done, float(np.mean(losses)) if losses else float("nan")
