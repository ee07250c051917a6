"""secure.he.service's evaluation pool: the event loop keeps serving while SEAL computes.

SEAL holds the GIL for the whole of each call (``bench/he.py``'s ``pool``
section measures it), so the async path evaluates in spawned worker processes.
Real TenSEAL, a real process pool, no mocks.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from fedvault.errors import InvalidRequestError
from secure.he.engine import CompiledModel
from secure.he.service import (
    ContextNotCached,
    EvalJob,
    HEModel,
    HEService,
    Payload,
    _write_spool,
    inspect_context_job,
    run_eval_job,
)
from tests.he_support import dataset, private_context, trained

MLP = "digits-mlp"
LR = "bc-logreg"


@cache
def _compiled(model_id: str) -> CompiledModel:
    from secure.he.plan import compile_plan

    name, kind = ("digits", "mlp") if model_id == MLP else ("breast-cancer", "logreg")
    return CompiledModel(compile_plan(*trained(name, kind)))


def _source(model_id: str) -> HEModel:
    compiled = _compiled(model_id)
    features = tuple(f"f{i}" for i in range(compiled.plan.n_features))
    classes = tuple(str(j) for j in range(compiled.plan.n_outputs))
    return HEModel(model_id, compiled, features, classes)


def test_async_path_never_blocks_the_event_loop() -> None:
    compiled = _compiled(MLP)
    vector_ctx = private_context(compiled.params, True, True)  # ~120 MB public context
    batch_ctx = private_context(compiled.params, False, True)
    x = dataset("digits")[2]
    ref = compiled.plan.forward(x)
    cols = [bytes(ts.ckks_vector(batch_ctx, c.tolist()).serialize()) for c in x.T]
    one = bytes(ts.ckks_vector(vector_ctx, x[0].tolist()).serialize())
    public = [bytes(c.serialize(save_secret_key=False)) for c in (vector_ctx, batch_ctx)]
    service = HEService(_source, workers=2)

    async def scenario() -> tuple[list[float], list[list[bytes]], str]:
        loop = asyncio.get_running_loop()
        lags: list[float] = []
        stop = asyncio.Event()

        async def health() -> None:  # all a /health handler needs: a turn of the loop
            while not stop.is_set():
                start = loop.time()
                await asyncio.sleep(0.005)
                lags.append(loop.time() - start - 0.005)

        ticker = asyncio.create_task(health())
        # Deserialising the 120 MB context is one GIL-holding SEAL call of
        # 0.5-1.5 s: in a thread it would stall the loop for all of it.
        regs = await asyncio.gather(
            *(service.register_context_async("alice", MLP, data) for data in public)
        )
        vec_id, batch_id = (str(r["context_id"]) for r in regs)
        outs = await asyncio.gather(
            service.infer_async("alice", MLP, batch_id, "batch", cols),
            service.infer_async("alice", MLP, vec_id, "vector", [one]),
            service.infer_async("alice", MLP, batch_id, "batch", cols),
        )
        # Refusals raised inside a worker come back as the same error, message intact.
        try:
            await service.infer_async(
                "alice", MLP, batch_id, "batch", [c[: len(c) // 2] for c in cols]
            )
            refused = ""
        except InvalidRequestError as exc:  # a caller's bad ciphertext, not our config
            refused = str(exc)
        stop.set()
        await ticker
        return lags, list(outs), refused

    try:
        lags, outs, refused = asyncio.run(scenario())
    finally:
        service.close()
    for batch in (outs[0], outs[2]):
        got = np.array([ts.ckks_vector_from(batch_ctx, o).decrypt() for o in batch]).T
        assert np.abs(got - ref).max() <= 1e-3
    logits = ts.ckks_vector_from(vector_ctx, outs[1][0]).decrypt()[: compiled.plan.n_outputs]
    assert np.abs(np.array(logits) - ref[0]).max() <= 1e-3
    assert "input 0 is not decodable as a CKKS vector" in refused
    assert len(lags) > 50
    # Generous for a shared 2-core machine; a blocked loop shows 0.4-1.5 s here.
    assert max(lags) < 0.3, f"event loop stalled for {max(lags):.3f} s"


def test_workers_get_a_context_once_then_by_digest(tmp_path: Path) -> None:
    compiled = _compiled(LR)
    ctx = private_context(compiled.params, True, False)
    data = bytes(ctx.serialize(save_secret_key=False))
    x = dataset("breast-cancer")[2][:3]
    blobs = [bytes(ts.ckks_vector(ctx, c.tolist()).serialize()) for c in x.T]
    # Big payloads travel as one spool file (no GIL-holding pickling of the bytes).
    spooled = Payload(tuple(map(len, blobs)), path=_write_spool(str(tmp_path), blobs))
    assert spooled.read() == blobs
    job = EvalJob(
        model_key="test-bc",
        plan=compiled.plan,
        params=compiled.params,
        context_digest=hashlib.sha256(data + b"other").hexdigest(),
        context=None,
        layout="batch",
        inputs=spooled,
    )
    with pytest.raises(ContextNotCached):
        run_eval_job(job)  # an unknown digest: the worker asks for the bytes
    facts = inspect_context_job(Payload((len(data),), inline=(data,)))  # and keeps it
    assert facts.digest == hashlib.sha256(data).hexdigest()
    assert not facts.has_secret_key
    outs = run_eval_job(replace(job, context_digest=facts.digest))
    got = np.array([ts.ckks_vector_from(ctx, o).decrypt() for o in outs]).T
    assert np.abs(got - compiled.plan.forward(x)).max() <= 1e-3
    secret_data = bytes(ctx.serialize(save_secret_key=True))
    secret = inspect_context_job(Payload((len(secret_data),), inline=(secret_data,)))
    assert secret.has_secret_key  # refused by the service, and never cached by a worker
    with pytest.raises(ContextNotCached):
        run_eval_job(replace(job, context_digest=secret.digest))
