"""Transport-independent HE inference service: metadata, context registry, encrypted infer.

The REST router (``server.he_api``) and, later, the gateway's gRPC servicer
call this class; nothing here knows about HTTP. It never sees a secret key: a
context that carries one is refused before it is stored.

Models come from a ``model_source`` callable the server supplies (``secure``
does no I/O of its own): it returns the compiled plan plus the names a caller
needs to build inputs and read outputs.

Contexts live in a :class:`ContextStore`. The in-memory store is enough for one
gateway process; N gateway replicas need a shared store (the gateway issue can
put serialised contexts in the database behind the same Protocol).

Every check raises a :class:`~fedvault.errors.FedvaultError` subclass whose
message names the problem (which input, which limit) but never echoes
ciphertext bytes, key material or TenSEAL's internal messages. What a caller
sent wrong (a context or ciphertext that does not decode, the wrong count or
layout, missing keys) is an :class:`~fedvault.errors.InvalidRequestError`
(400, gRPC ``INVALID_ARGUMENT``), never a ``ConfigError``: that one means the
*server's* configuration is wrong, and its title ("A configuration value is
missing…") sent callers looking in the wrong place.

Evaluation pool. SEAL (through ``tenseal.sealapi``) holds the GIL for the
whole of each call: two evaluations in two threads take as long as running
them one after the other, and an event-loop thread waits up to one SEAL call
(5–20 ms at N=16384; a whole ``ts.context_from`` of a 120 MB context) each
time it wants the GIL (measured by ``bench/he.py``, ``pool`` section). So the
async methods run in a process pool (``spawn``, one worker per core by
default): jobs carry ciphertext bytes and the model's plan (a few KB), and
each worker keeps an LRU of deserialised public contexts keyed by the SHA-256
of their bytes. A job names its context by that digest only; a worker that
does not hold it answers "not cached" and the job is sent again with the
context bytes (once per worker and context, not per call). The synchronous
methods evaluate in the calling thread (CLI, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing
import os
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import numpy as np
import tenseal as ts

from fedvault.encoding import encoding_for
from fedvault.errors import (
    ConfigError,
    ExpiredError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
)
from fedvault.modelspec import FloatArray, ModelSpec
from fedvault.schema import DataSchema
from fedvault.spool import make_spool
from fedvault.stats import Scaler
from secure.he.engine import LAYOUTS, CompiledModel, HEEvaluationError, Layout
from secure.he.params import CKKSParams, require_128_bit
from secure.he.plan import HEPlan, compile_plan

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class HEModel:
    """What the service needs of one model: compiled plan and human-readable names.

    ``schema`` (the public data schema the model was trained on, None when
    unknown) and ``missing_means`` let a caller encode raw rows itself: under
    HE the server never sees the row, so one-hot encoding and imputation
    happen on the caller's side (:mod:`secure.client`). ``missing_means``
    maps each encoded input a missing cell leaves empty (a ``mean``-imputed
    feature's value or one-hot columns) to the scaler's mean of that input,
    in encoded units: the value the plaintext gateway imputes (it
    standardises a missing entry to 0, i.e. to that mean).
    """

    model_id: str
    compiled: CompiledModel
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    schema: DataSchema | None = None
    missing_means: tuple[tuple[str, float], ...] = ()
    regression: bool = False

    @classmethod
    def build(
        cls,
        model_id: str,
        spec: ModelSpec,
        params: list[FloatArray],
        scaler: Scaler,
        schema: DataSchema | None,
    ) -> HEModel:
        """Compile a registered model and gather what its metadata publishes.

        ``schema``: the one the server serves the model's raw columns with
        (None, or one that does not fit the model, leaves the names generic).

        Raises:
            UnsupportedModelError: the model has no exact HE plan (a ReLU layer).
        """
        plan = compile_plan(spec, params, scaler)
        if schema is not None:
            encoding = encoding_for(schema)
            if encoding.width != spec.n_features or schema.is_regression != spec.is_regression:
                schema = None
        if schema is None:
            features = tuple(f"x{i}" for i in range(spec.n_features))
            classes = () if spec.is_regression else tuple(map(str, range(spec.n_classes)))
            return cls(
                model_id, CompiledModel(plan), features, classes, regression=spec.is_regression
            )
        # The scaler's mean is the federation's DP statistics release (fedvault.stats):
        # publishing part of it is post-processing of that release and costs no ε.
        mean = np.asarray(scaler.mean, dtype=np.float64)
        imputed = np.flatnonzero(encoding.indicator >= 0)
        means = tuple((encoding.names[j], float(mean[j])) for j in imputed)
        return cls(
            model_id,
            CompiledModel(plan),
            encoding.names,
            schema.classes,
            schema=schema,
            missing_means=means,
            regression=spec.is_regression,
        )


@dataclass(slots=True)
class ContextEntry:
    context_id: str
    owner: str
    params: CKKSParams
    context: ts.Context | None  # None until the synchronous path first needs it
    has_galois: bool
    has_relin: bool
    expires_at: float
    size: int
    data: bytes = b""  # the serialised public context, as registered
    digest: str = ""  # SHA-256 of ``data``: how pool workers cache it


@dataclass(frozen=True, slots=True)
class ContextFacts:
    """What the server checks of a public context, read where it was deserialised."""

    digest: str
    has_secret_key: bool
    has_public_key: bool
    has_galois: bool
    has_relin: bool
    poly_modulus_degree: int
    total_bits: int
    first_parms_id: tuple[int, ...]
    scale: float


def context_facts(context: ts.Context, digest: str) -> ContextFacts:
    """Read a deserialised context's keys and parameters (InvalidRequestError if not CKKS)."""
    try:
        seal = context.seal_context().data
        key = seal.key_context_data()
        degree = int(key.parms().poly_modulus_degree())
        total = int(key.total_coeff_modulus_bit_count())
        first = tuple(int(v) for v in seal.first_parms_id())
    except Exception:
        raise InvalidRequestError("context is not a CKKS context") from None
    try:
        scale = float(context.global_scale)
    except Exception:  # TenSEAL raises when no global scale was ever set
        scale = 0.0
    return ContextFacts(
        digest=digest,
        has_secret_key=bool(context.has_secret_key() or context.is_private()),
        has_public_key=bool(context.has_public_key()),
        has_galois=bool(context.has_galois_keys()),
        has_relin=bool(context.has_relin_keys()),
        poly_modulus_degree=degree,
        total_bits=total,
        first_parms_id=first,
        scale=scale,
    )


def _deserialise_context(data: bytes) -> ts.Context:
    try:
        return ts.context_from(data)
    except Exception:  # TenSEAL raises bare ValueError/RuntimeError on bad bytes
        raise InvalidRequestError("context is not a serialised TenSEAL context") from None


class ContextStore(Protocol):
    """Where registered public contexts live (in memory here; shared for replicas)."""

    def put(self, entry: ContextEntry) -> None: ...
    def get(self, context_id: str) -> ContextEntry | None: ...
    def delete(self, context_id: str) -> None: ...
    def purge_expired(self, now: float) -> None: ...


@dataclass
class InMemoryContextStore:
    """A dict behind a lock, with a cap on the total bytes held."""

    max_total_bytes: int = 2 * 1024**3
    _entries: dict[str, ContextEntry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, entry: ContextEntry) -> None:
        with self._lock:
            held = sum(e.size for e in self._entries.values())
            if held + entry.size > self.max_total_bytes:
                raise PayloadTooLargeError(
                    "the server holds too many registered contexts; retry after some expire"
                )
            self._entries[entry.context_id] = entry

    def get(self, context_id: str) -> ContextEntry | None:
        with self._lock:
            return self._entries.get(context_id)

    def delete(self, context_id: str) -> None:
        with self._lock:
            self._entries.pop(context_id, None)

    def purge_expired(self, now: float) -> None:
        with self._lock:
            # Expired entries keep a tombstone-free store; an expired id then reads
            # as unknown, except between expiry and purge where it reads as expired.
            for key in [k for k, e in self._entries.items() if e.expires_at <= now - 3600]:
                del self._entries[key]


def context_size_limit(params: CKKSParams) -> int:
    """Upper bound on a public context's size (public, relinearisation and galois keys).

    A key-switching key holds (L-1)·2 polynomials over L primes of N 64-bit
    words; SEAL's default galois set is 2·log2(N/2) + 1 keys.
    """
    n, primes = params.poly_modulus_degree, len(params.coeff_mod_bit_sizes)
    kswitch = (primes - 1) * 2 * primes * n * 8
    n_galois = 2 * (params.slots.bit_length() - 1) + 1
    return (n_galois + 2) * kswitch + 2 * primes * n * 8 + 256 * 1024


def ciphertext_size_limit(params: CKKSParams) -> int:
    """A fresh two-component ciphertext at the first level, plus framing."""
    data_primes = len(params.coeff_mod_bit_sizes) - 1
    return 2 * data_primes * params.poly_modulus_degree * 8 + 64 * 1024


# ------------------------------------------------------------------ evaluation
def evaluate_inputs(
    compiled: CompiledModel, context: ts.Context, layout: Layout, inputs: list[bytes]
) -> list[bytes]:
    """Deserialise and check the input ciphertexts under ``context``, then evaluate.

    Runs wherever the context is deserialised: the calling thread (synchronous
    path) or a pool worker. Counts, sizes and keys were checked by the caller.
    """
    cts: list[Any] = []
    sizes: set[int] = set()
    for index, blob in enumerate(inputs):
        ct, size = _load_vector(context, compiled, blob, index)
        cts.append(ct)
        sizes.add(size)
    if layout == "vector":
        if sizes != {compiled.plan.n_features}:
            raise InvalidRequestError(
                f"input 0 holds {sizes.pop()} values, the model takes "
                f"{compiled.plan.n_features} features"
            )
        return [compiled.evaluate_vector(context, cts[0])]
    if len(sizes) != 1:
        raise InvalidRequestError("batch columns must all hold the same number of samples")
    return compiled.evaluate_batch(context, cts, sizes.pop())


def _load_vector(
    context: ts.Context, compiled: CompiledModel, blob: bytes, index: int
) -> tuple[Any, int]:
    try:
        vec = ts.ckks_vector_from(context, blob)
        size = int(vec.size())
        parts = vec.ciphertext()
    except Exception:
        raise InvalidRequestError(
            f"input {index} is not decodable as a CKKS vector under the registered context "
            "(malformed, truncated, or encrypted with other parameters)"
        ) from None
    if len(parts) != 1 or size < 1:
        raise InvalidRequestError(
            f"input {index} must be one ciphertext of 1..{compiled.slots} values"
        )
    if size > compiled.slots:
        raise InvalidRequestError(
            f"input {index} holds {size} values, more than the {compiled.slots} slots"
        )
    ct = parts[0]
    if (
        ct.parms_id() != compiled.first_parms_id
        or ct.size() != 2
        or not ct.is_ntt_form()
        or ct.scale != compiled.scale
    ):
        raise InvalidRequestError(
            f"input {index} must be a fresh ciphertext (first level, scale "
            f"2^{compiled.params.scale_bits}), as ts.ckks_vector(ctx, values) makes"
        )
    return ct, size


# Pickling a large ``bytes`` into the pool's call queue holds the GIL for the
# whole copy (0.28 s for a 122 MB context): bigger payloads go through a spool
# file in a private tmpfs directory instead, written by a helper thread
# (``os.write`` releases the GIL) and read by the worker.
INLINE_PAYLOAD_BYTES = 2 * 1024**2


@dataclass(frozen=True, slots=True)
class Payload:
    """Byte strings for a pool job: inline when small, else one spool file."""

    sizes: tuple[int, ...]
    inline: tuple[bytes, ...] | None = None
    path: str | None = None

    def read(self) -> list[bytes]:
        if self.inline is not None:
            return list(self.inline)
        if self.path is None:
            raise HEEvaluationError("a pool job lost its payload")
        with open(self.path, "rb") as f:
            data = f.read()
        out, pos = [], 0
        for n in self.sizes:
            out.append(data[pos : pos + n])
            pos += n
        return out


def _write_spool(directory: str, blobs: list[bytes]) -> str:
    fd, path = tempfile.mkstemp(dir=directory, suffix=".bin")
    try:
        for blob in blobs:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return path


class ContextNotCached(Exception):
    """A pool worker does not hold the job's context: send the job again with its bytes."""


@dataclass(frozen=True, slots=True)
class EvalJob:
    """One encrypted evaluation as a pool worker receives it (picklable, no keys but public)."""

    model_key: str  # digest of plan and parameters
    plan: HEPlan
    params: CKKSParams
    context_digest: str
    context: Payload | None  # only when a worker answered ContextNotCached
    layout: Layout
    inputs: Payload


# Per-process caches (each pool worker has its own; a thread executor shares the
# main process's). Bounded: contexts by serialised bytes, models by count.
WORKER_CONTEXT_BYTES = 1024**3
WORKER_MODELS = 16
_worker_lock = threading.Lock()
_worker_contexts: OrderedDict[str, tuple[ts.Context, int]] = OrderedDict()
_worker_models: OrderedDict[str, CompiledModel] = OrderedDict()


def _cache_context(digest: str, context: ts.Context, size: int) -> None:
    with _worker_lock:
        _worker_contexts[digest] = (context, size)
        _worker_contexts.move_to_end(digest)
        held = sum(n for _, n in _worker_contexts.values())
        while held > WORKER_CONTEXT_BYTES and len(_worker_contexts) > 1:
            _, (_, n) = _worker_contexts.popitem(last=False)
            held -= n


def _cached_context(digest: str) -> ts.Context | None:
    with _worker_lock:
        hit = _worker_contexts.get(digest)
        if hit is None:
            return None
        _worker_contexts.move_to_end(digest)
        return hit[0]


def _worker_model(job: EvalJob) -> CompiledModel:
    with _worker_lock:
        hit = _worker_models.get(job.model_key)
        if hit is not None:
            _worker_models.move_to_end(job.model_key)
            return hit
    compiled = CompiledModel(job.plan, job.params)  # encodes plaintexts outside the lock
    with _worker_lock:
        _worker_models[job.model_key] = compiled
        while len(_worker_models) > WORKER_MODELS:
            _worker_models.popitem(last=False)
    return compiled


def inspect_context_job(payload: Payload) -> ContextFacts:
    """Pool job: deserialise a context, read its facts, keep it if it is public."""
    (data,) = payload.read()
    digest = hashlib.sha256(data).hexdigest()
    context = _deserialise_context(data)
    facts = context_facts(context, digest)
    if not facts.has_secret_key:
        _cache_context(digest, context, len(data))
    return facts


def run_eval_job(job: EvalJob) -> list[bytes]:
    """Pool job: evaluate ``job`` with the worker's cached model and context."""
    context = _cached_context(job.context_digest)
    if context is None:
        if job.context is None:
            raise ContextNotCached(job.context_digest)
        (data,) = job.context.read()
        context = _deserialise_context(data)
        _cache_context(job.context_digest, context, len(data))
    return evaluate_inputs(_worker_model(job), context, job.layout, job.inputs.read())


def _plan_key(compiled: CompiledModel) -> str:
    h = hashlib.sha256(repr(compiled.params).encode())
    for layer in compiled.plan.layers:
        for array in (layer.weight, layer.bias):
            h.update(repr(array.shape).encode())
            h.update(array.astype("<f8").tobytes())
    h.update(repr(compiled.plan.activations).encode())
    return h.hexdigest()


def default_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """Spawned workers (never fork a process that runs threads and SEAL), one per core."""
    n = workers or min(8, os.cpu_count() or 1)
    return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))


def _encoding_metadata(m: HEModel) -> dict[str, Any] | None:
    """How a caller turns a raw row into ``features`` (None: the model has no known schema).

    ``missing_means`` are entries of the scaler's mean, which the federation
    released under DP (:mod:`fedvault.stats`): publishing them is
    post-processing of that release and costs no privacy budget.
    """
    if m.schema is None:
        return None
    return {
        "columns": list(m.schema.feature_names),
        "missing_means": dict(m.missing_means),
        "rules": "raw columns in schema order (fedvault.encoding): a number is one input "
        "(clipped to [min, max] when out_of_range = 'clip', then log1p(x) when log1p); a "
        "boolean one 0/1 input; a category one 0/1 input per declared category (an "
        "undeclared value counts as 'other', refused when there is none); a feature with "
        "missing = 'mean' then adds a 0/1 missing indicator. A missing cell (null, NaN or "
        "one of the schema's missing_values) takes 'fill' (missing = 'constant'), or "
        "missing_means for each of its inputs and indicator 1 (missing = 'mean'), and is "
        "refused for missing = 'refuse'",
        "privacy": "missing_means are the model's standardisation means, released by the "
        "federation under differential privacy; publishing them is post-processing (no "
        "extra epsilon)",
    }


def _output_metadata(m: HEModel) -> dict[str, Any]:
    """What the decrypted outputs mean, and for regression how to bring them to target units."""
    k = m.compiled.plan.n_outputs
    out: dict[str, Any] = {"task": "regression" if m.regression else "classification"}
    out["n_outputs"] = k
    if not m.regression:
        out["meaning"] = "logits (pre-softmax scores), one per class; argmax = predicted class"
    elif m.schema is None or m.schema.target is None:
        out["meaning"] = "the model's output (the target's scale is not known for this model)"
    else:
        target = m.schema.target
        centre, radius = encoding_for(m.schema).target_scale
        out["meaning"] = (
            "the target rescaled into [-1, 1] by its public range: value = "
            "min(max(centre + radius * output, min), max), in the target's units"
        )
        out["target"] = {
            "column": m.schema.label,
            "min": target.min,
            "max": target.max,
            "centre": centre,
            "radius": radius,
        }
    out["classes"] = list(m.class_names)
    out["layouts"] = {
        "vector": f"one CKKS vector; its first {k} slot(s) are the {k} output(s)",
        "batch": f"{k} CKKS vector(s), one per output; slot i = sample i",
    }
    return out


class HEService:
    """Encrypted inference for the models ``model_source`` returns."""

    def __init__(
        self,
        model_source: Callable[[str], HEModel],
        *,
        store: ContextStore | None = None,
        context_ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        executor: Executor | None = None,
        workers: int | None = None,
    ) -> None:
        """``executor``: where the async methods evaluate; by default a process pool of
        ``workers`` spawned processes (one per core), created at the first async call.
        """
        self._source = model_source
        self._models: dict[str, HEModel] = {}
        self._model_keys: dict[str, str] = {}
        self._models_lock = threading.Lock()
        self._store = store or InMemoryContextStore()
        self._ttl = context_ttl_s
        self._clock = clock
        self._executor = executor
        self._owns_executor = executor is None
        self._workers = workers
        self._executor_lock = threading.Lock()
        # Spool files only help a process pool (a thread executor shares memory).
        self._spools = executor is None or isinstance(executor, ProcessPoolExecutor)
        self._spool: str | None = None

    def _pool(self) -> Executor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = default_pool(self._workers)
            return self._executor

    def close(self) -> None:
        """Stop the evaluation pool this service created (idempotent)."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None and self._owns_executor:
            executor.shutdown(wait=True, cancel_futures=True)
        with self._executor_lock:
            spool, self._spool = self._spool, None
        if spool is not None:
            shutil.rmtree(spool, ignore_errors=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the pool; a dead worker becomes an evaluation error and a new pool."""
        loop = asyncio.get_running_loop()
        executor = self._pool()
        try:
            return await loop.run_in_executor(executor, fn, *args)
        except BrokenProcessPool:
            with self._executor_lock:
                if self._executor is executor and self._owns_executor:
                    self._executor = None
                    executor.shutdown(wait=False, cancel_futures=True)
            raise HEEvaluationError("an encrypted-evaluation worker died; retry") from None

    # ------------------------------------------------------------- models
    def model(self, model_id: str) -> HEModel:
        with self._models_lock:
            cached = self._models.get(model_id)
        if cached is not None:
            return cached
        loaded = self._source(model_id)  # NotFoundError / UnsupportedModelError propagate
        with self._models_lock:
            self._models.setdefault(model_id, loaded)
            return self._models[model_id]

    def metadata(self, model_id: str) -> dict[str, Any]:
        """Everything a caller needs to build a context and inputs, and read outputs."""
        m = self.model(model_id)
        plan, params = m.compiled.plan, m.compiled.params
        needs_relin = bool(plan.activations)
        return {
            "model_id": model_id,
            "scheme": "CKKS",
            "library": "TenSEAL >=0.3.18,<0.4 (SEAL 4.x serialisation)",
            "parameters": params.to_dict(),
            "multiplicative_depth": plan.depth,
            "keys": {
                "public_key": True,
                "relin_keys": needs_relin,
                "galois_keys": {
                    "vector": "required (ctx.generate_galois_keys(), default power-of-two set)",
                    "batch": "not needed",
                },
                "secret_key": "never send: contexts with a secret key are refused",
            },
            "limits": {
                "context_bytes": context_size_limit(params),
                "ciphertext_bytes": ciphertext_size_limit(params),
                "batch_max_samples": params.slots,
                "context_ttl_s": self._ttl,
            },
            "features": list(m.feature_names),
            "schema": None if m.schema is None else m.schema.model_dump(mode="json"),
            "encoding": _encoding_metadata(m),
            "input": {
                "units": "the model's numeric input before standardisation, one value per "
                "name in 'features' (raw columns encoded on the caller's side as 'encoding' "
                "says; standardisation is folded into the model)",
                "layouts": {
                    "vector": {
                        "inputs": 1,
                        "recipe": "ts.ckks_vector(ctx, features)",
                        "size": plan.n_features,
                    },
                    "batch": {
                        "inputs": plan.n_features,
                        "recipe": "[ts.ckks_vector(ctx, column) for column in X.T]",
                        "size": f"1..{params.slots} samples, the same for every column",
                    },
                },
            },
            "output": _output_metadata(m),
        }

    # ----------------------------------------------------------- contexts
    def register_context(self, owner: str, model_id: str, data: bytes) -> dict[str, Any]:
        """Store a caller's *public* context for ``model_id``'s parameters; return its id."""
        compiled = self._check_size(model_id, data)
        context = _deserialise_context(data)
        facts = context_facts(context, hashlib.sha256(data).hexdigest())
        return self._store_context(owner, compiled, data, facts, context)

    async def register_context_async(
        self, owner: str, model_id: str, data: bytes
    ) -> dict[str, Any]:
        """:meth:`register_context` with the deserialisation in the evaluation pool."""
        compiled = self._check_size(model_id, data)
        async with self._payload([data]) as payload:
            facts = await self._run(inspect_context_job, payload)
        return self._store_context(owner, compiled, data, facts, None)

    def _check_size(self, model_id: str, data: bytes) -> CompiledModel:
        compiled = self.model(model_id).compiled
        limit = context_size_limit(compiled.params)
        if len(data) > limit:
            raise PayloadTooLargeError(
                f"context is {len(data)} bytes, the limit for these parameters is {limit}"
            )
        return compiled

    def _store_context(
        self,
        owner: str,
        compiled: CompiledModel,
        data: bytes,
        facts: ContextFacts,
        context: ts.Context | None,
    ) -> dict[str, Any]:
        if facts.has_secret_key:
            raise PermissionDeniedError(
                "context contains a secret key; serialise it with save_secret_key=False "
                "(the server must never hold your secret key)"
            )
        if not facts.has_public_key:
            raise InvalidRequestError("context has no public key")
        self._check_params(facts, compiled)
        entry = ContextEntry(
            context_id=secrets.token_urlsafe(18),
            owner=owner,
            params=compiled.params,
            context=context,
            has_galois=facts.has_galois,
            has_relin=facts.has_relin,
            expires_at=self._clock() + self._ttl,
            size=len(data),
            data=data if isinstance(data, bytes) else bytes(data),
            digest=facts.digest,
        )
        self._store.purge_expired(self._clock())
        self._store.put(entry)
        layouts = ["batch", "vector"] if entry.has_galois else ["batch"]
        return {"context_id": entry.context_id, "expires_in_s": self._ttl, "layouts": layouts}

    @staticmethod
    def _check_params(facts: ContextFacts, compiled: CompiledModel) -> None:
        params = compiled.params
        degree, total = facts.poly_modulus_degree, facts.total_bits
        try:
            require_128_bit(degree, total)
        except ConfigError as exc:  # the caller's context, not our configuration
            raise InvalidRequestError(f"context: {exc}") from None
        # The parms_id hashes N and every prime: equal ids mean identical parameters.
        if facts.first_parms_id != tuple(int(v) for v in compiled.first_parms_id):
            raise InvalidRequestError(
                f"context parameters (N={degree}, {total} coefficient modulus bits) differ "
                f"from the model's (N={params.poly_modulus_degree}, coeff_mod_bit_sizes="
                f"{list(params.coeff_mod_bit_sizes)}, {params.total_bits} bits)"
            )
        if facts.scale != params.global_scale:
            raise InvalidRequestError(f"context global_scale must be 2^{params.scale_bits}")

    def _entry(self, owner: str, context_id: str) -> ContextEntry:
        entry = self._store.get(context_id)
        if entry is None:
            raise NotFoundError("unknown context id; register a context first")
        if entry.owner != owner:
            # Same answer as unknown would leak less, but callers need to know why.
            raise PermissionDeniedError("this context id was registered by another caller")
        if entry.expires_at <= self._clock():
            self._store.delete(context_id)
            raise ExpiredError("context id has expired; register the context again")
        return entry

    def delete_context(self, owner: str, context_id: str) -> None:
        self._entry(owner, context_id)
        self._store.delete(context_id)

    # -------------------------------------------------------------- infer
    def _prepare(
        self, owner: str, model_id: str, context_id: str, layout: str, inputs: list[bytes]
    ) -> tuple[HEModel, ContextEntry, Layout]:
        """Every check that needs no deserialisation (cheap: runs on the caller's thread)."""
        model = self.model(model_id)
        compiled = model.compiled
        entry = self._entry(owner, context_id)
        if entry.params != compiled.params:
            raise InvalidRequestError(
                "context was registered for other CKKS parameters than this model"
            )
        if layout not in LAYOUTS:
            raise InvalidRequestError(
                f"layout must be one of {', '.join(LAYOUTS)}, got {layout[:32]!r}"
            )
        lay: Layout = "vector" if layout == "vector" else "batch"
        expected = 1 if lay == "vector" else compiled.plan.n_features
        if len(inputs) != expected:
            raise InvalidRequestError(
                f"layout {lay} takes {expected} ciphertext(s) for this model, got {len(inputs)}"
            )
        if lay == "vector" and not entry.has_galois:
            raise InvalidRequestError("the vector layout needs a context with galois keys")
        if compiled.plan.activations and not entry.has_relin:
            raise InvalidRequestError("this model needs a context with relinearisation keys")
        limit = ciphertext_size_limit(compiled.params)
        for index, blob in enumerate(inputs):
            if len(blob) > limit:
                raise PayloadTooLargeError(
                    f"input {index} is {len(blob)} bytes, more than one fresh ciphertext under "
                    f"the model's parameters (limit {limit}): at most {compiled.slots} values "
                    "(slots) per input"
                )
        return model, entry, lay

    def infer(
        self, owner: str, model_id: str, context_id: str, layout: str, inputs: list[bytes]
    ) -> list[bytes]:
        """Validate inputs, evaluate, return serialised result vectors (blocking, this thread)."""
        model, entry, lay = self._prepare(owner, model_id, context_id, layout, inputs)
        if entry.context is None:
            entry.context = _deserialise_context(entry.data)
        return evaluate_inputs(model.compiled, entry.context, lay, inputs)

    async def infer_async(
        self, owner: str, model_id: str, context_id: str, layout: str, inputs: list[bytes]
    ) -> list[bytes]:
        """:meth:`infer` in the evaluation pool, so the event loop never blocks."""
        model, entry, lay = self._prepare(owner, model_id, context_id, layout, inputs)
        job = EvalJob(
            model_key=self._model_key(model_id, model.compiled),
            plan=model.compiled.plan,
            params=model.compiled.params,
            context_digest=entry.digest,
            context=None,
            layout=lay,
            inputs=Payload(tuple(map(len, inputs))),
        )
        async with self._payload(inputs) as payload:
            job = replace(job, inputs=payload)
            try:
                return await self._run(run_eval_job, job)
            except ContextNotCached:
                pass
            # This worker has not seen the context yet: send it once with the job.
            async with self._payload([entry.data]) as context:
                return await self._run(run_eval_job, replace(job, context=context))

    @asynccontextmanager
    async def _payload(self, blobs: list[bytes]) -> AsyncIterator[Payload]:
        sizes = tuple(map(len, blobs))
        if sum(sizes) <= INLINE_PAYLOAD_BYTES or not self._spools:
            yield Payload(sizes, inline=tuple(blobs))
            return
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(None, _write_spool, self._spool_dir(), blobs)
        try:
            yield Payload(sizes, path=path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _spool_dir(self) -> str:
        with self._executor_lock:
            if self._spool is None or not os.path.isdir(self._spool):  # tmp cleaners
                shm = "/dev/shm"  # noqa: S108 (mkdtemp below: unique name, mode 0700)
                base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
                # 0700, named by pid: a server killed -9 leaves it, the next removes it.
                self._spool = make_spool("fedvault-he-", base)
                # Removed by close(), else when the service is collected or at exit.
                weakref.finalize(self, shutil.rmtree, self._spool, True)
            return self._spool

    def _model_key(self, model_id: str, compiled: CompiledModel) -> str:
        with self._models_lock:
            key = self._model_keys.get(model_id)
        if key is None:
            key = _plan_key(compiled)
            with self._models_lock:
                self._model_keys[model_id] = key
        return key
