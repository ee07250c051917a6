"""Encrypted evaluation of an :class:`~secure.he.plan.HEPlan` (server side, public keys only).

Two input layouts, both producible with TenSEAL's public Python API alone:

``vector``  one sample, ``ts.ckks_vector(ctx, features)``: feature i in slot i.
            Output: one CKKS vector whose first k slots are the k logits.
``batch``   feature-major: one ``ts.ckks_vector(ctx, column_i)`` per feature,
            slot s = sample s (up to N/2 samples). Output: k CKKS vectors,
            slot s = logit of sample s.

Why not TenSEAL's ``enc_x.matmul(W)``: it rotates once per input feature
(64 key switches for a 64-feature model) and rescales after every product.
Here we drive SEAL's evaluator (``tenseal.sealapi``, shipped with TenSEAL) on
the very ciphertexts TenSEAL deserialised, which lets us:

- *batch*: multiply each feature ciphertext by plaintext scalars (a constant
  plaintext is a pointwise product, no rotation at all), sum, and rescale once
  per output (lazy rescaling): the cost is k·d cheap products per N/2 samples;
- *vector*, last layer ("replicate, one product, stride-sum"): replicate x into
  K = 2^⌈log2 k⌉ copies with period P (odd, ≥ d) using log2 K rotations, multiply
  once by a plaintext that puts W[j, i] at the slot s ≡ j (mod K), s ≡ i (mod P)
  (Chinese remainder theorem: K and P coprime), rescale, then fold slots with
  stride K using ⌈log2 P⌉ rotations (all powers of two, so one key switch
  each, at the cheaper post-rescale level). Slot j then holds logit j. That is
  log2 K + ⌈log2 P⌉ rotations (11 for 64×10) instead of d;
- *vector*, hidden layer (its output feeds an activation, so slots outside
  [0, n_out) must stay zero): baby-step giant-step over the generalised
  diagonals, ~2·√(n_in + n_out) rotations, one rescale per giant step.

Plaintexts are encoded once per (model, parameters) with scale equal to the
prime the next rescale divides by, so ciphertext scales stay exactly 2^40
through linear layers. SEAL's plaintexts depend only on the encryption
parameters, not on keys, so every caller's context reuses them.

Thread-safety: a :class:`CompiledModel` is read-only after construction; each
evaluation builds its own Evaluator and temporaries, so evaluations can run in
a worker pool concurrently.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from fedvault.errors import ConfigError, FedvaultError
from secure.he.params import CKKSParams, params_for_depth
from secure.he.plan import DenseLayer, HEPlan

Layout = Literal["vector", "batch"]
LAYOUTS: tuple[Layout, ...] = ("vector", "batch")


class HEEvaluationError(FedvaultError):
    """SEAL refused an operation on data that passed validation (a server bug)."""


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# --------------------------------------------------------------- serialisation
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _save_ciphertext(ct: Any) -> bytes:
    """SEAL's own serialisation of ``ct`` (what TenSEAL embeds in its protobuf).

    The sealapi binding only saves to a path; an anonymous memory file keeps
    this in RAM (no disk I/O, nothing left behind).
    """
    fd = os.memfd_create("fedvault-he", os.MFD_CLOEXEC)
    try:
        ct.save(f"/proc/self/fd/{fd}")
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def ckks_vector_bytes(ct: Any, size: int, scale: float) -> bytes:
    """A TenSEAL ``CKKSVectorProto`` holding one SEAL ciphertext of ``size`` values.

    Loadable with ``ts.ckks_vector_from(ctx, data)`` by any TenSEAL ≥ 0.3.
    Fields: 1 ``sizes`` (packed uint32), 2 ``ciphertexts`` (bytes), 3 ``scale`` (double).
    """
    body = _save_ciphertext(ct)
    sizes = _varint(size)
    return (
        b"\x0a"
        + _varint(len(sizes))
        + sizes
        + b"\x12"
        + _varint(len(body))
        + body
        + b"\x19"
        + struct.pack("<d", scale)
    )


# ------------------------------------------------------------- compiled model
@dataclass(frozen=True, slots=True)
class _Level:
    parms_id: Any
    last_prime: float  # value of the prime the next rescale divides by


@dataclass(frozen=True, slots=True)
class _CrtLayer:
    """Last layer of the vector layout: replicate, one product, stride-sum."""

    period: int  # P: input period (n_in for TenSEAL-replicated input, else odd ≥ n_in)
    copies: int  # K ≥ n_out, coprime with P: the fold stride
    replicate: int  # copies we make ourselves (1 when the input is already replicated)
    fold_steps: int  # ⌈log2 P⌉
    weights: Any  # Plaintext at level, scale = that level's last prime
    bias: Any  # Plaintext at the next level, scale = the ciphertext's after rescale
    n_out: int


@dataclass(frozen=True, slots=True)
class _DiagLayer:
    """Hidden layer of the vector layout: BSGS over generalised diagonals."""

    offset: int  # t0 = -(n_out - 1): rotation applied to the input first
    baby: int  # B
    giant: list[list[Any | None]]  # [g][b] Plaintext or None (all-zero diagonal)
    bias: Any
    n_out: int


class CompiledModel:
    """An HE plan bound to CKKS parameters, with its plaintexts pre-encoded."""

    def __init__(self, plan: HEPlan, params: CKKSParams | None = None) -> None:
        self.plan = plan
        self.params = params or required_params(plan)
        if self.params.depth < plan.depth:
            raise ConfigError(
                f"parameters hold {self.params.depth} rescales, the model needs {plan.depth}"
            )
        if not self.params.is_128_bit_secure():
            raise ConfigError("refusing CKKS parameters below 128-bit security")
        enc = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        enc.set_poly_modulus_degree(self.params.poly_modulus_degree)
        enc.set_coeff_modulus(
            sealapi.CoeffModulus.Create(
                self.params.poly_modulus_degree, list(self.params.coeff_mod_bit_sizes)
            )
        )
        self._seal = sealapi.SEALContext(enc, True, sealapi.SEC_LEVEL_TYPE.TC128)
        if not self._seal.parameters_set():
            raise ConfigError("SEAL rejected the CKKS parameters")
        self._encoder = sealapi.CKKSEncoder(self._seal)
        self.slots = int(self._encoder.slot_count())
        levels: list[_Level] = []
        data = self._seal.first_context_data()
        while data is not None:
            moduli = data.parms().coeff_modulus()
            levels.append(_Level(data.parms_id(), float(moduli[-1].value())))
            data = data.next_context_data()
        self._levels = levels
        self.first_parms_id = levels[0].parms_id
        self.scale = self.params.global_scale
        self._vector_layers = self._compile_vector()

    # -- encoding helpers
    def _encode(self, values: np.ndarray[Any, Any], level: int, scale: float) -> Any:
        pt = sealapi.Plaintext()
        full = np.zeros(self.slots, dtype=np.float64)
        full[: len(values)] = values
        self._encoder.encode(full.tolist(), self._levels[level].parms_id, scale, pt)
        return pt

    def _encode_scalar(self, value: float, level: int, scale: float) -> Any:
        pt = sealapi.Plaintext()
        self._encoder.encode(float(value), self._levels[level].parms_id, scale, pt)
        return pt

    # -- vector layout compilation
    def _compile_vector(self) -> list[_CrtLayer | _DiagLayer | str]:
        """Pre-encode the vector layout's plaintexts, tracking level and scale exactly.

        Scales are simulated with the same double arithmetic SEAL performs
        (products multiply scales, a rescale divides by the dropped prime).
        """
        ops: list[_CrtLayer | _DiagLayer | str] = []
        level, scale = 0, self.scale
        n_layers = len(self.plan.layers)
        for index, layer in enumerate(self.plan.layers):
            q = self._levels[level].last_prime
            out_scale = scale * q / q
            if index == n_layers - 1:
                crt = self._crt_layer(layer, level, q, out_scale, replicated=index == 0)
                ops.append(crt)
            else:
                ops.append(self._diag_layer(layer, level, q, out_scale))
            level, scale = level + 1, out_scale
            if index < len(self.plan.activations):
                ops.append("square")
                scale = scale * scale / self._levels[level].last_prime
                level += 1
        return ops

    def _crt_layer(
        self, layer: DenseLayer, level: int, q: float, out_scale: float, *, replicated: bool
    ) -> _CrtLayer:
        """Plaintext for "replicate, one product, stride-sum".

        ``replicated``: the input is a ciphertext TenSEAL encrypted, which holds
        x[s mod n_in] in every slot s (TenSEAL replicates vectors to fill the
        slots), so the period is n_in and no rotation is needed to replicate; the
        fold stride K is then the cheapest integer ≥ n_out coprime with n_in. Else
        the input is zero beyond n_in (a hidden layer's clean output): we replicate
        it ourselves with an odd period P ≥ n_in and fold with K = 2^⌈log2 n_out⌉.
        """
        n_in, n_out = layer.n_in, layer.n_out
        period, copies, replicate = _crt_shape(n_in, n_out, replicated=replicated)
        fold_steps = max(0, (period - 1).bit_length())
        if 2 * copies * period > self.slots:
            raise ConfigError(
                f"layer {n_in}→{n_out} does not fit the vector layout in {self.slots} slots"
            )
        inv = pow(period % copies, -1, copies) if copies > 1 else 0
        m = np.zeros(copies * period, dtype=np.float64)
        for j in range(n_out):
            for i in range(n_in):
                t = ((j - i) * inv) % copies if copies > 1 else 0
                m[i + period * t] = layer.weight[j, i]
        return _CrtLayer(
            period=period,
            copies=copies,
            replicate=replicate,
            fold_steps=fold_steps,
            weights=self._encode(m, level, q),
            bias=self._encode(layer.bias, level + 1, out_scale),
            n_out=n_out,
        )

    def _diag_layer(self, layer: DenseLayer, level: int, q: float, out_scale: float) -> _DiagLayer:
        n_in, n_out = layer.n_in, layer.n_out
        if n_in + n_out > self.slots:
            raise ConfigError(f"layer {n_in}→{n_out} does not fit in {self.slots} slots")
        offset = -(n_out - 1)
        n_diag = n_in + n_out - 1
        baby = max(1, math.ceil(math.sqrt(n_diag)))
        giant_count = math.ceil(n_diag / baby)
        giant: list[list[Any | None]] = []
        rows = np.arange(n_out)
        for g in range(giant_count):
            row: list[Any | None] = []
            for b in range(baby):
                u = g * baby + b
                diag = np.zeros(self.slots, dtype=np.float64)
                if u < n_diag:
                    cols = rows + u + offset
                    ok = (cols >= 0) & (cols < n_in)
                    diag[rows[ok]] = layer.weight[rows[ok], cols[ok]]
                if not diag.any():
                    row.append(None)
                    continue
                row.append(self._encode(np.roll(diag, g * baby), level, q))
            giant.append(row)
        return _DiagLayer(
            offset=offset,
            baby=baby,
            giant=giant,
            bias=self._encode(layer.bias, level + 1, out_scale),
            n_out=n_out,
        )

    # -- evaluation
    def evaluate_vector(self, context: ts.Context, ct: Any) -> bytes:
        """Logits of one sample (validated ciphertext at the first level) → CKKSVector bytes."""
        ev = sealapi.Evaluator(context.seal_context().data)
        galois = context.galois_keys().data if context.has_galois_keys() else None
        relin = context.relin_keys().data if context.has_relin_keys() else None
        cur = ct
        try:
            for op in self._vector_layers:
                if isinstance(op, str):
                    cur = _square(ev, cur, relin)
                elif isinstance(op, _CrtLayer):
                    cur = _apply_crt(ev, cur, op, galois)
                else:
                    cur = _apply_diag(ev, cur, op, galois)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise HEEvaluationError(f"encrypted evaluation failed ({type(exc).__name__})") from None
        return ckks_vector_bytes(cur, self.plan.n_outputs, self.scale)

    def evaluate_batch(
        self, context: ts.Context, columns: list[Any], n_samples: int
    ) -> list[bytes]:
        """Logits for ``n_samples`` samples, one validated ciphertext per feature."""
        ev = sealapi.Evaluator(context.seal_context().data)
        relin = context.relin_keys().data if context.has_relin_keys() else None
        current = list(columns)
        level, scale = 0, self.scale
        try:
            for index, layer in enumerate(self.plan.layers):
                q = self._levels[level].last_prime
                outputs = []
                for j in range(layer.n_out):
                    terms = []
                    for i in range(layer.n_in):
                        w = float(layer.weight[j, i])
                        if w == 0.0:
                            continue
                        prod = sealapi.Ciphertext()
                        ev.multiply_plain(current[i], self._encode_scalar(w, level, q), prod)
                        terms.append(prod)
                    if not terms:  # all-zero row: 0 · x keeps level and scale
                        prod = sealapi.Ciphertext()
                        ev.multiply_plain(current[0], self._encode_scalar(0.0, level, q), prod)
                        terms.append(prod)
                    acc = sealapi.Ciphertext()
                    ev.add_many(terms, acc)
                    ev.rescale_to_next_inplace(acc)
                    bias = self._encode_scalar(float(layer.bias[j]), level + 1, acc.scale)
                    ev.add_plain_inplace(acc, bias)
                    outputs.append(acc)
                current = outputs
                level, scale = level + 1, scale * q / q
                if index < len(self.plan.activations):
                    current = [_square(ev, c, relin) for c in current]
                    level += 1
        except (RuntimeError, ValueError, TypeError) as exc:
            raise HEEvaluationError(f"encrypted evaluation failed ({type(exc).__name__})") from None
        return [ckks_vector_bytes(c, n_samples, self.scale) for c in current]


def required_params(plan: HEPlan) -> CKKSParams:
    """CKKS parameters for ``plan``: its depth, and room for the vector packing."""
    last = plan.layers[-1]
    period, copies, _ = _crt_shape(last.n_in, last.n_out, replicated=len(plan.layers) == 1)
    need = max(2 * copies * period, *(lay.n_in + lay.n_out for lay in plan.layers))
    return params_for_depth(plan.depth, min_slots=need)


def galois_needed(plan: HEPlan) -> bool:
    """Rotations (hence galois keys) are needed by the vector layout only."""
    return True


def relin_needed(plan: HEPlan) -> bool:
    """Ciphertext-ciphertext products (square) need relinearisation keys."""
    return bool(plan.activations)


# ------------------------------------------------------------------ primitives
def _crt_shape(n_in: int, n_out: int, *, replicated: bool) -> tuple[int, int, int]:
    """(period P, fold stride K, copies to make) of a last layer; see ``_crt_layer``."""
    if replicated:
        candidates = (k for k in range(n_out, 4 * n_out + 8) if math.gcd(k, n_in) == 1)
        return n_in, min(candidates, key=lambda k: (_naf_weight(k), k)), 1
    period = n_in if n_in % 2 == 1 else n_in + 1
    copies = _next_pow2(n_out)
    return period, copies, copies


def _naf_weight(n: int) -> int:
    """Non-zero digits of n's non-adjacent form: SEAL's key switches per rotation by n."""
    weight = 0
    while n:
        if n & 1:
            n -= 2 - (n & 3)
            weight += 1
        n >>= 1
    return weight


def _rotate(ev: Any, ct: Any, steps: int, galois: Any) -> Any:
    if galois is None:
        raise ConfigError("the vector layout needs a context with galois keys")
    out = sealapi.Ciphertext()
    ev.rotate_vector(ct, steps, galois, out)
    return out


def _square(ev: Any, ct: Any, relin: Any) -> Any:
    if relin is None:
        raise ConfigError("this model needs a context with relinearisation keys")
    out = sealapi.Ciphertext()
    ev.square(ct, out)
    ev.relinearize_inplace(out, relin)
    ev.rescale_to_next_inplace(out)
    return out


def _apply_crt(ev: Any, ct: Any, layer: _CrtLayer, galois: Any) -> Any:
    rep = ct
    step = 1
    while step < layer.replicate:
        rotated = _rotate(ev, rep, -step * layer.period, galois)
        summed = sealapi.Ciphertext()
        ev.add(rep, rotated, summed)
        rep = summed
        step *= 2
    acc = sealapi.Ciphertext()
    ev.multiply_plain(rep, layer.weights, acc)
    ev.rescale_to_next_inplace(acc)
    for t in range(layer.fold_steps):
        ev.add_inplace(acc, _rotate(ev, acc, layer.copies << t, galois))
    ev.add_plain_inplace(acc, layer.bias)
    return acc


def _apply_diag(ev: Any, ct: Any, layer: _DiagLayer, galois: Any) -> Any:
    base = _rotate(ev, ct, layer.offset, galois) if layer.offset else ct
    babies: list[Any] = [base]
    for b in range(1, layer.baby):
        babies.append(_rotate(ev, base, b, galois))
    acc: Any = None
    for g, row in enumerate(layer.giant):
        terms = []
        for b, pt in enumerate(row):
            if pt is None:
                continue
            prod = sealapi.Ciphertext()
            ev.multiply_plain(babies[b], pt, prod)
            terms.append(prod)
        if not terms:
            continue
        inner = sealapi.Ciphertext()
        ev.add_many(terms, inner)
        ev.rescale_to_next_inplace(inner)
        if g:
            inner = _rotate(ev, inner, g * layer.baby, galois)
        if acc is None:
            acc = inner
        else:
            ev.add_inplace(acc, inner)
    if acc is None:
        raise ConfigError("a hidden layer has only zero weights")
    ev.add_plain_inplace(acc, layer.bias)
    return acc
