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
- *vector*, every layer is "one plaintext product, rescale, stride-sum"
  (Chinese remainder theorem packing). The input of a layer is *replicated*
  with some period P: slot t holds x[t mod P] (TenSEAL's ``ckks_vector``
  replicates the d features over all slots, so the first layer's P is d; a
  hidden layer's output is replicated by construction, see below). Choose a
  stride K ≥ n_out coprime with P and multiply once by the plaintext holding
  W[t mod K, t mod P] at slot t; after the rescale, summing the P copies
  rotated by K·m (m < P) leaves in slot s the full dot product of row
  s mod K with x, because s + K·m runs over every residue mod P while staying
  ≡ s (mod K). So:

  - *hidden layer*: the result is the layer's output replicated with period
    K over as many slots as the next layer reads (no mask, no extra level);
    the P-term stride-sum costs ⌊log2 P⌋ + popcount(P) − 1 rotations;
  - *last layer*: the plaintext is zero beyond K·P slots, the fold uses
    ⌈log2 P⌉ rotations by K·2^t and slot j < k holds logit j.

  For the digits MLP 64→32→10 that is 6 rotations by 33·2^t after the first
  rescale and 6 by 16·2^t at the last level (18 key switches, 6 of them on a
  one-prime ciphertext), against ~45 key switches for baby-step giant-step
  diagonals and 64 rotations per layer for TenSEAL's ``matmul``.

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

from fedvault.errors import ConfigError, FedvaultError, InvalidRequestError
from secure.he.params import CKKSParams, params_for_depth
from secure.he.plan import DenseLayer, HEPlan

Layout = Literal["vector", "batch"]
LAYOUTS: tuple[Layout, ...] = ("vector", "batch")


class HEEvaluationError(FedvaultError):
    """SEAL refused an operation on data that passed validation (a server bug)."""


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
    """Last layer of the vector layout: one product, stride-sum into slots [0, n_out)."""

    period: int  # P: the input's replication period
    stride: int  # K ≥ n_out, coprime with P: the fold stride
    fold_steps: int  # ⌈log2 P⌉ doublings
    weights: Any  # Plaintext at level, scale = that level's last prime
    bias: Any  # Plaintext at the next level, scale = the ciphertext's after rescale
    n_out: int


@dataclass(frozen=True, slots=True)
class _PeriodicLayer:
    """Hidden layer of the vector layout: output replicated with period ``stride``."""

    period: int  # P: the input's replication period (terms of the stride-sum)
    stride: int  # K ≥ n_out, coprime with P: the output's period
    weights: Any
    bias: Any
    n_out: int


@dataclass(frozen=True, slots=True)
class VectorShape:
    """Packing of one layer in the vector layout (see the module docstring)."""

    period: int  # P, replication period of the layer's input
    stride: int  # K, fold stride (= output period for a hidden layer)
    reads: int  # input slots [0, reads) the layer depends on
    writes: int  # output slots [0, writes) that are valid (what the next layer reads)


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
    def _compile_vector(self) -> list[_CrtLayer | _PeriodicLayer | str]:
        """Pre-encode the vector layout's plaintexts, tracking level and scale exactly.

        Scales are simulated with the same double arithmetic SEAL performs
        (products multiply scales, a rescale divides by the dropped prime).
        """
        shapes = vector_shapes(self.plan)
        last = shapes[-1]
        if shapes[0].reads > self.slots or 2 * last.stride * last.period > self.slots:
            raise ConfigError(
                f"model {self.plan.n_features}→…→{self.plan.n_outputs} does not fit the vector "
                f"layout in {self.slots} slots"
            )
        ops: list[_CrtLayer | _PeriodicLayer | str] = []
        level, scale = 0, self.scale
        n_layers = len(self.plan.layers)
        for index, (layer, shape) in enumerate(zip(self.plan.layers, shapes, strict=True)):
            q = self._levels[level].last_prime
            out_scale = scale * q / q
            if index == n_layers - 1:
                ops.append(self._crt_layer(layer, shape, level, q, out_scale))
            else:
                ops.append(self._periodic_layer(layer, shape, level, q, out_scale))
            level, scale = level + 1, out_scale
            if index < len(self.plan.activations):
                ops.append("square")
                scale = scale * scale / self._levels[level].last_prime
                level += 1
        return ops

    def _crt_layer(
        self, layer: DenseLayer, shape: VectorShape, level: int, q: float, out_scale: float
    ) -> _CrtLayer:
        """Plaintext W[j, i] at the slot s < K·P with s ≡ i (mod P), s ≡ j (mod K)."""
        period, stride = shape.period, shape.stride
        slots = np.arange(stride * period)
        rows, cols = slots % stride, slots % period
        ok = (rows < layer.n_out) & (cols < layer.n_in)
        m = np.zeros(stride * period, dtype=np.float64)
        m[ok] = layer.weight[rows[ok], cols[ok]]
        return _CrtLayer(
            period=period,
            stride=stride,
            fold_steps=max(0, (period - 1).bit_length()),
            weights=self._encode(m, level, q),
            bias=self._encode(layer.bias, level + 1, out_scale),
            n_out=layer.n_out,
        )

    def _periodic_layer(
        self, layer: DenseLayer, shape: VectorShape, level: int, q: float, out_scale: float
    ) -> _PeriodicLayer:
        """Plaintext W[t mod K, t mod P] on every slot t the valid outputs read."""
        period, stride = shape.period, shape.stride
        t = np.arange(shape.reads)
        rows, cols = t % stride, t % period
        ok = (rows < layer.n_out) & (cols < layer.n_in)
        m = np.zeros(shape.reads, dtype=np.float64)
        m[ok] = layer.weight[rows[ok], cols[ok]]
        s = np.arange(shape.writes) % stride
        bias = np.where(s < layer.n_out, layer.bias[np.minimum(s, layer.n_out - 1)], 0.0)
        return _PeriodicLayer(
            period=period,
            stride=stride,
            weights=self._encode(m, level, q),
            bias=self._encode(bias, level + 1, out_scale),
            n_out=layer.n_out,
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
                    cur = _apply_periodic(ev, cur, op, galois)
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
                    if not terms:
                        # An all-zero row. 0 · x would be a transparent ciphertext,
                        # which SEAL refuses; one quantum (1/q: the encoded integer 1)
                        # keeps level and scale and adds |x| / q ≈ |x| · 1e-12, far
                        # below CKKS's precision.
                        prod = sealapi.Ciphertext()
                        ev.multiply_plain(current[0], self._encode_scalar(1.0 / q, level, q), prod)
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


def vector_shapes(plan: HEPlan) -> list[VectorShape]:
    """Per-layer packing of the vector layout, and the slots each layer reads and writes.

    Strides are chosen forward (each coprime with its input's period, fewest
    key switches per rotation first); the valid ranges backward: the last
    layer reads K·P slots, a hidden layer must write what the next one reads
    and reads K·(P − 1) slots beyond that.
    """
    period = plan.n_features
    strides: list[tuple[int, int]] = []
    for layer in plan.layers:
        stride = _coprime_stride(layer.n_out, period)
        strides.append((period, stride))
        period = stride
    shapes: list[VectorShape] = []
    reads = 0
    for index, (p, k) in enumerate(reversed(strides)):
        if index == 0:
            writes, reads = k, k * p
        else:
            writes = reads
            reads = writes + k * (p - 1)
        shapes.append(VectorShape(period=p, stride=k, reads=reads, writes=writes))
    return shapes[::-1]


def required_params(plan: HEPlan) -> CKKSParams:
    """CKKS parameters for ``plan``: its depth, and room for the vector packing."""
    shapes = vector_shapes(plan)
    last = shapes[-1]
    need = max(2 * last.stride * last.period, shapes[0].reads)
    return params_for_depth(plan.depth, min_slots=need)


def galois_needed(plan: HEPlan) -> bool:
    """Rotations (hence galois keys) are needed by the vector layout only."""
    return True


def relin_needed(plan: HEPlan) -> bool:
    """Ciphertext-ciphertext products (square) need relinearisation keys."""
    return bool(plan.activations)


# ------------------------------------------------------------------ primitives
def _coprime_stride(n_out: int, period: int) -> int:
    """Stride K ≥ n_out coprime with ``period``: fewest key switches per rotation, then smallest."""
    candidates = (k for k in range(n_out, 4 * n_out + 8) if math.gcd(k, period) == 1)
    return min(candidates, key=lambda k: (_naf_weight(k), k))


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
        raise InvalidRequestError("the vector layout needs a context with galois keys")
    out = sealapi.Ciphertext()
    ev.rotate_vector(ct, steps, galois, out)
    return out


def _square(ev: Any, ct: Any, relin: Any) -> Any:
    if relin is None:
        raise InvalidRequestError("this model needs a context with relinearisation keys")
    out = sealapi.Ciphertext()
    ev.square(ct, out)
    ev.relinearize_inplace(out, relin)
    ev.rescale_to_next_inplace(out)
    return out


def _apply_crt(ev: Any, ct: Any, layer: _CrtLayer, galois: Any) -> Any:
    acc = sealapi.Ciphertext()
    ev.multiply_plain(ct, layer.weights, acc)
    ev.rescale_to_next_inplace(acc)
    for t in range(layer.fold_steps):
        ev.add_inplace(acc, _rotate(ev, acc, layer.stride << t, galois))
    ev.add_plain_inplace(acc, layer.bias)
    return acc


def _apply_periodic(ev: Any, ct: Any, layer: _PeriodicLayer, galois: Any) -> Any:
    acc = sealapi.Ciphertext()
    ev.multiply_plain(ct, layer.weights, acc)
    ev.rescale_to_next_inplace(acc)
    acc = _stride_sum(ev, acc, layer.stride, layer.period, galois)
    ev.add_plain_inplace(acc, layer.bias)
    return acc


def _stride_sum(ev: Any, ct: Any, stride: int, count: int, galois: Any) -> Any:
    """Σ_{m < count} rot(ct, stride·m): ⌊log2 count⌋ doublings + popcount(count) − 1 rotations."""
    result: Any = None
    block, size, done = ct, 1, 0  # block = Σ_{m < size} rot(ct, stride·m)
    while True:
        if count & size:
            if result is None:
                result = block
            else:
                part = _rotate(ev, block, stride * done, galois)
                ev.add_inplace(part, result)
                result = part
            done += size
        if done == count:
            return result
        doubled = sealapi.Ciphertext()
        ev.add(block, _rotate(ev, block, stride * size, galois), doubled)
        block, size = doubled, size * 2
