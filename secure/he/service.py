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
ciphertext bytes, key material or TenSEAL's internal messages.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import tenseal as ts

from fedvault.errors import (
    ConfigError,
    ExpiredError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
)
from secure.he.engine import LAYOUTS, CompiledModel, Layout
from secure.he.params import CKKSParams, require_128_bit


@dataclass(frozen=True, slots=True)
class HEModel:
    """What the service needs of one model: compiled plan and human-readable names."""

    model_id: str
    compiled: CompiledModel
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]


@dataclass(slots=True)
class ContextEntry:
    context_id: str
    owner: str
    params: CKKSParams
    context: ts.Context
    has_galois: bool
    has_relin: bool
    expires_at: float
    size: int


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
    ) -> None:
        self._source = model_source
        self._models: dict[str, HEModel] = {}
        self._models_lock = threading.Lock()
        self._store = store or InMemoryContextStore()
        self._ttl = context_ttl_s
        self._clock = clock
        # SEAL's evaluator holds the GIL between calls only briefly; a thread pool
        # keeps the event loop responsive and shares compiled plaintexts in memory.
        self._executor = executor or ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="fedvault-he"
        )

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
            "input": {
                "units": "raw feature values, in the order of 'features' (standardisation "
                "is folded into the model)",
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
            "output": {
                "meaning": "logits (pre-softmax scores), one per class; argmax = predicted class",
                "classes": list(m.class_names),
                "layouts": {
                    "vector": "one CKKS vector; its first k slots are the k logits",
                    "batch": "k CKKS vectors, one per class; slot i = sample i",
                },
            },
        }

    # ----------------------------------------------------------- contexts
    def register_context(self, owner: str, model_id: str, data: bytes) -> dict[str, Any]:
        """Store a caller's *public* context for ``model_id``'s parameters; return its id."""
        compiled = self.model(model_id).compiled
        params = compiled.params
        limit = context_size_limit(params)
        if len(data) > limit:
            raise PayloadTooLargeError(
                f"context is {len(data)} bytes, the limit for these parameters is {limit}"
            )
        try:
            context = ts.context_from(data)
        except Exception:  # TenSEAL raises bare ValueError/RuntimeError on bad bytes
            raise ConfigError("context is not a serialised TenSEAL context") from None
        if context.has_secret_key() or context.is_private():
            raise PermissionDeniedError(
                "context contains a secret key; serialise it with save_secret_key=False "
                "(the server must never hold your secret key)"
            )
        if not context.has_public_key():
            raise ConfigError("context has no public key")
        self._check_params(context, compiled)
        entry = ContextEntry(
            context_id=secrets.token_urlsafe(18),
            owner=owner,
            params=params,
            context=context,
            has_galois=bool(context.has_galois_keys()),
            has_relin=bool(context.has_relin_keys()),
            expires_at=self._clock() + self._ttl,
            size=len(data),
        )
        self._store.purge_expired(self._clock())
        self._store.put(entry)
        layouts = ["batch", "vector"] if entry.has_galois else ["batch"]
        return {"context_id": entry.context_id, "expires_in_s": self._ttl, "layouts": layouts}

    def _check_params(self, context: ts.Context, compiled: CompiledModel) -> None:
        params = compiled.params
        try:
            seal = context.seal_context().data
            key = seal.key_context_data()
            degree = int(key.parms().poly_modulus_degree())
            total = int(key.total_coeff_modulus_bit_count())
            first = list(seal.first_parms_id())
        except Exception:
            raise ConfigError("context is not a CKKS context") from None
        require_128_bit(degree, total)
        # The parms_id hashes N and every prime: equal ids mean identical parameters.
        if first != list(compiled.first_parms_id):
            raise ConfigError(
                f"context parameters (N={degree}, {total} coefficient modulus bits) differ "
                f"from the model's (N={params.poly_modulus_degree}, coeff_mod_bit_sizes="
                f"{list(params.coeff_mod_bit_sizes)}, {params.total_bits} bits)"
            )
        try:
            scale = float(context.global_scale)
        except Exception:  # TenSEAL raises when no global scale was ever set
            scale = 0.0
        if scale != params.global_scale:
            raise ConfigError(f"context global_scale must be 2^{params.scale_bits}")

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
    def infer(
        self, owner: str, model_id: str, context_id: str, layout: str, inputs: list[bytes]
    ) -> list[bytes]:
        """Validate inputs, evaluate, return serialised result vectors (blocking)."""
        model = self.model(model_id)
        compiled = model.compiled
        entry = self._entry(owner, context_id)
        if entry.params != compiled.params:
            raise ConfigError("context was registered for other CKKS parameters than this model")
        if layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        lay: Layout = "vector" if layout == "vector" else "batch"
        expected = 1 if lay == "vector" else compiled.plan.n_features
        if len(inputs) != expected:
            raise ConfigError(
                f"layout {lay} takes {expected} ciphertext(s) for this model, got {len(inputs)}"
            )
        if lay == "vector" and not entry.has_galois:
            raise ConfigError("the vector layout needs a context with galois keys")
        if compiled.plan.activations and not entry.has_relin:
            raise ConfigError("this model needs a context with relinearisation keys")
        limit = ciphertext_size_limit(compiled.params)
        cts: list[Any] = []
        sizes: set[int] = set()
        for index, blob in enumerate(inputs):
            if len(blob) > limit:
                raise PayloadTooLargeError(
                    f"input {index} is {len(blob)} bytes, more than one fresh ciphertext under "
                    f"the model's parameters (limit {limit}): at most {compiled.slots} values "
                    "(slots) per input"
                )
            ct, size = self._load_vector(entry, compiled, blob, index)
            cts.append(ct)
            sizes.add(size)
        if lay == "vector":
            if sizes != {compiled.plan.n_features}:
                raise ConfigError(
                    f"input 0 holds {sizes.pop()} values, the model takes "
                    f"{compiled.plan.n_features} features"
                )
            return [compiled.evaluate_vector(entry.context, cts[0])]
        if len(sizes) != 1:
            raise ConfigError("batch columns must all hold the same number of samples")
        return compiled.evaluate_batch(entry.context, cts, sizes.pop())

    async def infer_async(
        self, owner: str, model_id: str, context_id: str, layout: str, inputs: list[bytes]
    ) -> list[bytes]:
        """:meth:`infer` in the worker pool, so the event loop never blocks."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.infer, owner, model_id, context_id, layout, inputs
        )

    async def register_context_async(
        self, owner: str, model_id: str, data: bytes
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.register_context, owner, model_id, data
        )

    @staticmethod
    def _load_vector(
        entry: ContextEntry, compiled: CompiledModel, blob: bytes, index: int
    ) -> tuple[Any, int]:
        try:
            vec = ts.ckks_vector_from(entry.context, blob)
            size = int(vec.size())
            parts = vec.ciphertext()
        except Exception:
            raise ConfigError(
                f"input {index} is not a CKKS vector under the registered context "
                "(malformed, truncated, or encrypted with other parameters)"
            ) from None
        if len(parts) != 1 or size < 1:
            raise ConfigError(f"input {index} must be one ciphertext of 1..{compiled.slots} values")
        if size > compiled.slots:
            raise ConfigError(
                f"input {index} holds {size} values, more than the {compiled.slots} slots"
            )
        ct = parts[0]
        if (
            ct.parms_id() != compiled.first_parms_id
            or ct.size() != 2
            or not ct.is_ntt_form()
            or ct.scale != compiled.scale
        ):
            raise ConfigError(
                f"input {index} must be a fresh ciphertext (first level, scale "
                f"2^{compiled.params.scale_bits}), as ts.ckks_vector(ctx, values) makes"
            )
        return ct, size
