"""Shared helpers for the HE tests: quick plaintext training, contexts, a live server.

Models are trained with a few hundred steps of full-batch gradient descent in
NumPy (no federation, no torch): the HE tests need realistic weights, not
good models.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
import tenseal as ts
import uvicorn
from numpy.typing import NDArray

from fedvault.datasets import load_builtin
from fedvault.modelspec import FloatArray, ModelSpec, init_parameters
from fedvault.stats import Scaler
from secure.he.params import CKKSParams
from server.registry import ModelRegistry, ensure_model_keys, load_model_keys
from server.store import FederationStore

F64 = NDArray[np.float64]


@cache
def dataset(name: str) -> tuple[F64, NDArray[np.int64], F64, NDArray[np.int64]]:
    """(x_train, y_train, x_test, y_test) raw features, a fixed 80/20 split."""
    x, y, _ = load_builtin(name)  # type: ignore[arg-type]
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _softmax_grad(logits: F64, y: NDArray[np.int64]) -> F64:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return p / len(y)


@cache
def trained(name: str, kind: str) -> tuple[ModelSpec, list[FloatArray], Scaler]:
    """A model trained on ``name`` in plaintext (standardised inputs, as federations do)."""
    x, y, _, _ = dataset(name)
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-3)
    xs = (x - mean) / std
    k = int(y.max()) + 1
    spec = ModelSpec(kind=kind, n_features=x.shape[1], n_classes=k, hidden=16)  # type: ignore[arg-type]
    params = [p.astype(np.float64) for p in init_parameters(spec, 0)]
    lr = 0.5 if kind == "logreg" else 0.05
    for _ in range(200):
        if kind == "logreg":
            w, b = params
            g = _softmax_grad(xs @ w.T + b, y)
            params = [w - lr * g.T @ xs, b - lr * g.sum(axis=0)]
        else:
            w1, b1, w2, b2 = params
            z = xs @ w1.T + b1
            a = z * z
            g = _softmax_grad(a @ w2.T + b2, y)
            ga = g @ w2 * 2 * z
            params = [
                w1 - lr * ga.T @ xs,
                b1 - lr * ga.sum(axis=0),
                w2 - lr * g.T @ a,
                b2 - lr * g.sum(axis=0),
            ]
    return spec, [p.astype(np.float32) for p in params], Scaler(mean=mean, std=std)


@cache
def private_context(params: CKKSParams, galois: bool, relin: bool) -> ts.Context:
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    ctx.global_scale = params.global_scale
    if galois:
        ctx.generate_galois_keys()
    if relin:
        ctx.generate_relin_keys()
    return ctx


def public_copy(ctx: ts.Context) -> ts.Context:
    """What the server holds: the context as the caller serialised it, minus the secret key."""
    return ts.context_from(ctx.serialize(save_secret_key=False))


def make_registry(home: Path, *, create_run: bool = True) -> tuple[FederationStore, ModelRegistry]:
    ensure_model_keys(home / "keys")
    store = FederationStore(home / "federation.db")
    if create_run:
        store.create_run("run-he", {}, {})
    return store, ModelRegistry(store, home / "registry", load_model_keys(home / "keys"))


def register(registry: ModelRegistry, name: str, dataset_name: str, kind: str) -> str:
    spec, params, scaler = trained(dataset_name, kind)
    return registry.register(
        name=name,
        run_id="run-he",
        spec=spec,
        params=params,
        scaler=scaler,
        lineage={"run_id": "run-he", "dataset": dataset_name, "private": False},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(app: object) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a thread; yield its URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
