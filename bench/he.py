"""Encrypted inference benchmark: fedvault's CKKS engine against TenSEAL's naive matmul.

Prints one JSON document. For each model (digits softmax, breast-cancer
logistic regression, digits square-MLP), all on the same CKKS parameters:

- baseline: ``ts.ckks_vector(ctx, x).matmul(W) + b`` per sample (for the MLP:
  matmul, square, matmul), measured in this run;
- batch: server compute for a full batch of N/2 samples (feature-major), as
  encrypted samples/s and as a ratio to the baseline's samples/s;
- vector: server compute per sample, and its speed-up over the baseline;
- client: encrypt/decrypt time and bytes on the wire per sample, both layouts;
- accuracy: plaintext test accuracy, max |HE - plaintext| logit error.

Then ``pool``: does SEAL release the GIL (two MLP vector evaluations in two
threads vs one after the other), and what the event loop sees while
``HEService``'s async path registers a 120 MB public context and runs batch
and vector inferences concurrently, with a thread executor vs the default
process pool (max loop lag, wall time of two concurrent evaluations).

Usage: ``python bench/he.py [--quick]`` (quick: fewer repetitions).
Models are trained here in plaintext with NumPy gradient descent (a few
seconds): the benchmark measures encrypted evaluation, not training.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np
import tenseal as ts

from fedvault.datasets import load_builtin
from fedvault.modelspec import ModelSpec, init_parameters
from fedvault.stats import Scaler
from secure.he.engine import CompiledModel
from secure.he.plan import HEPlan, compile_plan
from secure.he.service import HEModel, HEService


def _train(name: str, kind: str, hidden: int = 32) -> tuple[HEPlan, np.ndarray, np.ndarray, float]:
    x, y, _ = load_builtin(name)  # type: ignore[arg-type]
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    xtr, ytr, xte, yte = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
    mean, std = xtr.mean(axis=0), np.maximum(xtr.std(axis=0), 1e-3)
    xs = (xtr - mean) / std
    spec = ModelSpec(kind=kind, n_features=x.shape[1], n_classes=int(y.max()) + 1, hidden=hidden)  # type: ignore[arg-type]
    params = [p.astype(np.float64) for p in init_parameters(spec, 0)]
    lr = 0.5 if kind == "logreg" else 0.05
    for _ in range(300):
        if kind == "logreg":
            w, b = params
            logits = xs @ w.T + b
        else:
            w1, b1, w2, b2 = params
            z = xs @ w1.T + b1
            logits = (z * z) @ w2.T + b2
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(ytr)), ytr] -= 1.0
        g = p / len(ytr)
        if kind == "logreg":
            params = [w - lr * g.T @ xs, b - lr * g.sum(axis=0)]
        else:
            ga = g @ w2 * 2 * z
            params = [
                w1 - lr * ga.T @ xs,
                b1 - lr * ga.sum(axis=0),
                w2 - lr * g.T @ (z * z),
                b2 - lr * g.sum(axis=0),
            ]
    plan = compile_plan(spec, [p.astype(np.float32) for p in params], Scaler(mean, std))
    accuracy = float((plan.forward(xte).argmax(axis=1) == yte).mean())
    return plan, xte, yte, accuracy


def _timed(fn: Any, repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _naive(ctx: ts.Context, plan: HEPlan, sample: np.ndarray) -> Any:
    v = ts.ckks_vector(ctx, sample.tolist())
    for i, layer in enumerate(plan.layers):
        v = v.matmul(layer.weight.T.tolist()) + layer.bias.tolist()
        if i < len(plan.activations):
            v = v.square()
    return v


def bench_model(label: str, name: str, kind: str, quick: bool) -> dict[str, Any]:
    plan, xte, _, accuracy = _train(name, kind)
    compiled = CompiledModel(plan)
    p = compiled.params
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, p.poly_modulus_degree, coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes)
    )
    ctx.global_scale = p.global_scale
    ctx.generate_galois_keys()
    ctx.generate_relin_keys()
    server = ts.context_from(ctx.serialize(save_secret_key=False))
    ref = plan.forward(xte)
    k = plan.n_outputs

    # Baseline: TenSEAL's naive per-sample matmul on the same parameters.
    n_naive = 2 if quick else 5
    naive_s = statistics.median(
        _timed(lambda s=s: _naive(server, plan, s), 1)[0] for s in xte[:n_naive]
    )

    # Vector layout: one sample at a time.
    n_vec = 3 if quick else 15
    enc_s, blob = _timed(lambda: ts.ckks_vector(ctx, xte[0].tolist()).serialize(), n_vec)
    vec_times, vec_err = [], 0.0
    out = b""
    for sample, want in zip(xte[:n_vec], ref[:n_vec], strict=True):
        ct = ts.ckks_vector_from(server, ts.ckks_vector(ctx, sample.tolist()).serialize())
        start = time.perf_counter()
        out = compiled.evaluate_vector(server, ct.ciphertext()[0])
        vec_times.append(time.perf_counter() - start)
        got = np.array(ts.ckks_vector_from(ctx, out).decrypt()[:k])
        vec_err = max(vec_err, float(np.abs(got - want).max()))
    dec_s, _ = _timed(lambda: ts.ckks_vector_from(ctx, out).decrypt(), n_vec)
    vector_s = statistics.median(vec_times)

    # Batch layout: a full batch of N/2 samples (test rows tiled).
    n = p.slots
    rows = np.resize(xte, (n, xte.shape[1]))
    start = time.perf_counter()
    cols = [ts.ckks_vector(ctx, c.tolist()).serialize() for c in rows.T]
    batch_enc_s = time.perf_counter() - start
    loaded = [ts.ckks_vector_from(server, c).ciphertext()[0] for c in cols]
    reps = 1 if quick else 3
    batch_s, outs = _timed(lambda: compiled.evaluate_batch(server, loaded, n), reps)
    start = time.perf_counter()
    got = np.array([ts.ckks_vector_from(ctx, o).decrypt() for o in outs]).T
    batch_dec_s = time.perf_counter() - start
    batch_ref = plan.forward(rows)
    top2 = np.sort(batch_ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3
    agree = float((got.argmax(axis=1) == batch_ref.argmax(axis=1))[clear].mean())

    naive_tput = 1.0 / naive_s
    batch_tput = n / batch_s
    return {
        "model": label,
        "shape": [plan.n_features, *[layer.n_out for layer in plan.layers]],
        "plaintext_test_accuracy": round(accuracy, 4),
        "params": {
            "poly_modulus_degree": p.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(p.coeff_mod_bit_sizes),
            "scale": f"2^{p.scale_bits}",
        },
        "baseline_naive_matmul_ms_per_sample": round(naive_s * 1e3, 2),
        "vector": {
            "server_ms_per_sample": round(vector_s * 1e3, 2),
            "speedup_vs_naive": round(naive_s / vector_s, 1),
            "client_encrypt_ms": round(enc_s * 1e3, 2),
            "client_decrypt_ms": round(dec_s * 1e3, 2),
            "bytes_up_per_sample": len(blob),
            "bytes_down_per_sample": len(out),
            "max_abs_logit_error": vec_err,
        },
        "batch": {
            "samples": n,
            "server_s": round(batch_s, 3),
            "samples_per_s": round(batch_tput, 1),
            "throughput_ratio_vs_naive": round(batch_tput / naive_tput, 0),
            "client_encrypt_ms_per_sample": round(batch_enc_s / n * 1e3, 4),
            "client_decrypt_ms_per_sample": round(batch_dec_s / n * 1e3, 4),
            "bytes_up_per_sample": round(sum(map(len, cols)) / n, 1),
            "bytes_down_per_sample": round(sum(map(len, outs)) / n, 1),
            "max_abs_logit_error": float(np.abs(got - batch_ref).max()),
            "class_agreement_margin_gt_1e-3": agree,
        },
        "context_bytes": {
            "public_with_galois": len(ctx.serialize(save_secret_key=False)),
            "public_without_galois": len(
                ctx.serialize(save_secret_key=False, save_galois_keys=False)
            ),
        },
    }


_POOL_MODEL: list[CompiledModel] = []


def _pool_source(model_id: str) -> HEModel:
    compiled = _POOL_MODEL[0]
    features = tuple(f"f{i}" for i in range(compiled.plan.n_features))
    return HEModel(model_id, compiled, features, tuple(map(str, range(compiled.plan.n_outputs))))


async def _serve_scenario(
    service: HEService, contexts: list[bytes], cols: list[bytes], one: bytes
) -> dict[str, float]:
    """Loop lag while a 120 MB context registers and HE work runs; two concurrent evals."""
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            start = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - start - 0.005)

    task = asyncio.create_task(ticker())
    start = time.perf_counter()
    regs = await asyncio.gather(*(service.register_context_async("b", "m", c) for c in contexts))
    vec_id, batch_id = (str(r["context_id"]) for r in regs)
    await asyncio.gather(
        service.infer_async("b", "m", batch_id, "batch", cols),
        service.infer_async("b", "m", vec_id, "vector", [one]),
        service.infer_async("b", "m", vec_id, "vector", [one]),
    )
    first_s = time.perf_counter() - start
    rounds = []  # the first rounds also hand the context to workers that lack it
    for _ in range(6):
        start = time.perf_counter()
        await asyncio.gather(
            *(service.infer_async("b", "m", vec_id, "vector", [one]) for _ in range(2))
        )
        rounds.append(time.perf_counter() - start)
    two_vector_s = statistics.median(rounds[3:])
    start = time.perf_counter()
    await asyncio.gather(
        *(service.infer_async("b", "m", batch_id, "batch", cols) for _ in range(2))
    )
    two_batch_s = time.perf_counter() - start
    stop.set()
    await task
    return {
        "max_loop_lag_ms": round(max(lags) * 1e3, 1),
        "p99_loop_lag_ms": round(float(np.percentile(lags, 99)) * 1e3, 1),
        "register_and_first_inferences_s": round(first_s, 2),
        "two_concurrent_vector_s": round(two_vector_s, 3),
        "two_concurrent_batch_s": round(two_batch_s, 3),
    }


def bench_pool(quick: bool) -> dict[str, Any]:
    """GIL measurement and event-loop behaviour of the async service path (digits MLP)."""
    plan, xte, _, _ = _train("digits", "mlp")
    compiled = CompiledModel(plan)
    _POOL_MODEL[:] = [compiled]
    p = compiled.params
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, p.poly_modulus_degree, coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes)
    )
    ctx.global_scale = p.global_scale
    ctx.generate_galois_keys()
    ctx.generate_relin_keys()
    public = bytes(ctx.serialize(save_secret_key=False))
    server = ts.context_from(public)
    one = bytes(ts.ckks_vector(ctx, xte[0].tolist()).serialize())
    ct = ts.ckks_vector_from(server, one).ciphertext()[0]
    compiled.evaluate_vector(server, ct)  # warm

    def two_sequential() -> None:
        for _ in range(2):
            compiled.evaluate_vector(server, ct)

    def two_threads() -> None:
        threads = [
            threading.Thread(target=compiled.evaluate_vector, args=(server, ct)) for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    reps = 2 if quick else 5
    seq_s, _ = _timed(two_sequential, reps)
    thr_s, _ = _timed(two_threads, reps)

    contexts = [public, bytes(ctx.serialize(save_secret_key=False, save_galois_keys=False))]
    cols = [bytes(ts.ckks_vector(ctx, c.tolist()).serialize()) for c in np.resize(xte, (512, 64)).T]
    executors: dict[str, Executor | None] = {
        "thread_pool_2": ThreadPoolExecutor(2),
        "process_pool_2 (default)": None,
    }
    serving: dict[str, Any] = {}
    for label, executor in executors.items():
        service = HEService(_pool_source, executor=executor, workers=2)
        try:
            serving[label] = asyncio.run(_serve_scenario(service, contexts, cols, one))
        finally:
            service.close()
            if executor is not None:
                executor.shutdown()
    return {
        "model": "digits MLP, square activation, hidden 32 (vector layout, N=16384)",
        "public_context_bytes": len(public),
        "gil": {
            "two_evaluations_sequential_s": round(seq_s, 3),
            "two_evaluations_two_threads_s": round(thr_s, 3),
            "thread_speedup": round(seq_s / thr_s, 2),
            "verdict": "SEAL holds the GIL" if seq_s / thr_s < 1.3 else "SEAL releases the GIL",
        },
        "async_service": serving,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    models = [
        ("digits softmax (logreg)", "digits", "logreg"),
        ("breast-cancer logistic (logreg)", "breast-cancer", "logreg"),
        ("digits MLP, square activation, hidden 32", "digits", "mlp"),
    ]
    results = [bench_model(label, name, kind, args.quick) for label, name, kind in models]
    pool = bench_pool(args.quick)
    print(
        json.dumps(
            {
                "benchmark": "bench/he.py" + (" --quick" if args.quick else ""),
                "tenseal": ts.__version__,
                "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
                "models": results,
                "pool": pool,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
