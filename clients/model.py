"""The torch twin of :class:`fedvault.modelspec.ModelSpec`, built on a partner node."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedvault.modelspec import FloatArray, ModelSpec


class Square(nn.Module):
    """x ↦ x²: the CKKS-friendly activation (one ciphertext multiplication)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Quad(nn.Module):
    """z ↦ z + α·z²: a square MLP after reparametrisation (see secure.he.plan)."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * (x * x)


def build_model(spec: ModelSpec) -> nn.Module:
    """A module whose ``parameters()`` order matches ``ModelSpec.shapes()``."""
    if spec.kind == "logreg":
        return nn.Sequential(nn.Linear(spec.n_features, spec.n_classes))
    act: nn.Module
    if spec.activation == "square":
        act = Square()
    elif spec.activation == "quad":
        act = Quad(spec.alpha())
    else:
        act = nn.ReLU()
    return nn.Sequential(
        nn.Linear(spec.n_features, spec.hidden), act, nn.Linear(spec.hidden, spec.n_classes)
    )


def load_parameters(model: nn.Module, params: list[FloatArray]) -> None:
    with torch.no_grad():
        for p, value in zip(model.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))


def get_parameters(model: nn.Module) -> list[FloatArray]:
    return [p.detach().cpu().numpy().astype(np.float32, copy=True) for p in model.parameters()]
