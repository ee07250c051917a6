"""Evaluation metrics that add up across partners.

A partner cannot send its held-out rows, so it sends *sums* from which the
coordinator computes the federation's metrics exactly as if the test splits
were pooled: counts, a confusion matrix and score histograms for
classification (accuracy, balanced accuracy, log loss, ROC AUC), and sums of
errors and targets for regression (RMSE, MAE, R², in the target's units).

What leaves a partner: aggregates of its held-out split under the trained
model, as every round already reports loss and accuracy. They are not
differentially private; the histograms are coarse (:data:`AUC_BINS` bins) so
that no single test row's score can be read off them unless the split is tiny.
ROC AUC from binned scores counts ties within a bin as half, so it can differ
from the exact AUC by at most the mass that shares bins (here < 0.01 on
flchain, checked in tests against scikit-learn).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedvault.modelspec import FloatArray, ModelSpec, forward, regression_loss

__all__ = ["AUC_BINS", "combine", "headline", "partner_sums", "summarise", "sums_length"]

AUC_BINS = 50


def _softmax(logits: NDArray[np.float64]) -> NDArray[np.float64]:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def partner_sums(
    spec: ModelSpec,
    params: list[FloatArray],
    x: FloatArray,
    y: NDArray[Any],
    *,
    target_scale: tuple[float, float] = (0.0, 1.0),
) -> list[float]:
    """The sums one partner reports for standardised ``x`` and labels ``y``.

    Regression labels are in the rescaled units the model learns
    (``target_scale`` = (centre, radius) maps them back).
    """
    n = len(y)
    if spec.is_regression:
        centre, radius = target_scale
        z = forward(spec, params, x)[:, 0].astype(np.float64) if n else np.zeros(0)
        target = np.asarray(y, dtype=np.float64)
        loss = float(regression_loss(spec, z - target).sum())
        pred = centre + radius * np.clip(z, -1.0, 1.0)
        truth = centre + radius * target
        err = pred - truth
        return [
            float(n),
            loss,
            float((err**2).sum()),
            float(np.abs(err).sum()),
            float(truth.sum()),
            float((truth**2).sum()),
        ]
    k = spec.n_classes
    labels = np.asarray(y, dtype=np.int64)
    if n:
        logits = forward(spec, params, x).astype(np.float64)
        probs = _softmax(logits)
        loss = float(-np.log(np.clip(probs[np.arange(n), labels], 1e-300, None)).sum())
        predicted = probs.argmax(axis=1)
    else:
        probs = np.zeros((0, k))
        loss = 0.0
        predicted = np.zeros(0, dtype=np.int64)
    confusion = np.zeros((k, k))
    np.add.at(confusion, (labels, predicted), 1.0)
    bins = np.minimum((probs * AUC_BINS).astype(np.int64), AUC_BINS - 1)
    hist = np.zeros((k, AUC_BINS, 2))  # class, score bin, (is this class, is not)
    for c in range(k):
        positive = labels == c
        hist[c, :, 0] = np.bincount(bins[positive, c], minlength=AUC_BINS)
        hist[c, :, 1] = np.bincount(bins[~positive, c], minlength=AUC_BINS)
    correct = float(np.trace(confusion))
    return [float(n), loss, correct, *confusion.ravel().tolist(), *hist.ravel().tolist()]


def combine(parts: list[list[float]]) -> list[float]:
    """The federation's sums (element-wise total of partners' sums)."""
    if not parts:
        return []
    return np.sum(np.asarray(parts, dtype=np.float64), axis=0).tolist()  # type: ignore[no-any-return]


def _auc(hist: NDArray[np.float64]) -> float | None:
    """AUC of one score against one class from (bin, positive/negative) counts."""
    pos, neg = hist[:, 0], hist[:, 1]
    if pos.sum() == 0 or neg.sum() == 0:
        return None
    below = np.cumsum(neg) - neg  # negatives in lower bins
    wins = float((pos * (below + 0.5 * neg)).sum())
    return wins / float(pos.sum() * neg.sum())


def summarise(spec: ModelSpec, sums: list[float]) -> dict[str, float | None]:
    """Named metrics from combined sums (None where undefined, e.g. no test rows)."""
    if not sums or sums[0] == 0:
        if spec.is_regression:
            return {"eval_loss": None, "rmse": None, "mae": None, "r2": None}
        return {
            "eval_loss": None,
            "eval_accuracy": None,
            "balanced_accuracy": None,
            "roc_auc": None,
        }
    n, loss = sums[0], sums[1]
    if spec.is_regression:
        sse, sae, sy, sy2 = sums[2:6]
        spread = sy2 - sy * sy / n
        return {
            "eval_loss": loss / n,
            "rmse": float(np.sqrt(sse / n)),
            "mae": sae / n,
            "r2": 1.0 - sse / spread if spread > 0 else None,
        }
    k = spec.n_classes
    confusion = np.asarray(sums[3 : 3 + k * k]).reshape(k, k)
    hist = np.asarray(sums[3 + k * k :]).reshape(k, AUC_BINS, 2)
    support = confusion.sum(axis=1)
    recalls = [confusion[c, c] / support[c] for c in range(k) if support[c] > 0]
    if k == 2:
        auc = _auc(hist[1])
    else:
        aucs = [a for a in (_auc(hist[c]) for c in range(k)) if a is not None]
        auc = float(np.mean(aucs)) if aucs else None
    return {
        "eval_loss": loss / n,
        "eval_accuracy": sums[2] / n,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "roc_auc": auc,
    }


def sums_length(spec: ModelSpec) -> int:
    """How many numbers :func:`partner_sums` reports for ``spec``."""
    if spec.is_regression:
        return 6
    k = spec.n_classes
    return 3 + k * k + k * AUC_BINS * 2


_HEADLINE = (("eval_accuracy", "acc"), ("roc_auc", "auc"), ("r2", "R²"))


def headline(final: dict[str, Any]) -> str:
    """A model's final metrics in one line: a classifier's accuracy (and ROC AUC
    where reported), a regressor's R² (what ``models list`` and the console show)."""
    return ", ".join(
        f"{label} {final[key]:.4f}"
        for key, label in _HEADLINE
        if isinstance(final.get(key), int | float) and not isinstance(final.get(key), bool)
    )
