"""secure.he.service: context registry rules and refusal of bad ciphertexts.

A small breast-cancer logistic model (N=8192) keeps every case fast. No mocks:
real TenSEAL contexts and ciphertexts, a fake clock only for the TTL.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import tenseal as ts

from fedvault.errors import (
    ExpiredError,
    FedvaultError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UnsupportedModelError,
)
from fedvault.modelspec import ModelSpec, init_parameters
from fedvault.stats import Scaler
from secure.he.engine import CompiledModel
from secure.he.params import CKKSParams
from secure.he.plan import compile_plan
from secure.he.service import HEModel, HEService, context_size_limit
from tests.he_support import dataset, private_context, trained

MODEL = "bc-logreg"
PARAMS = CKKSParams(8192, (60, 40, 60))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _source(model_id: str) -> HEModel:
    if model_id == MODEL:
        spec, params, scaler = trained("breast-cancer", "logreg")
        plan = compile_plan(spec, params, scaler)
        names = tuple(f"f{i}" for i in range(spec.n_features))
        return HEModel(model_id, CompiledModel(plan), names, ("malignant", "benign"))
    if model_id == "relu":
        spec = ModelSpec(kind="mlp", n_features=3, n_classes=2, hidden=2, activation="relu")
        compile_plan(spec, init_parameters(spec, 0), Scaler(np.zeros(3), np.ones(3)))
    raise NotFoundError(f"no model {model_id!r}")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(clock: Clock) -> HEService:
    return HEService(_source, context_ttl_s=60, clock=clock)


@pytest.fixture
def ctx() -> ts.Context:
    return private_context(PARAMS, True, False)


@pytest.fixture
def cid(service: HEService, ctx: ts.Context) -> str:
    return str(
        service.register_context("alice", MODEL, ctx.serialize(save_secret_key=False))["context_id"]
    )


def _x() -> np.ndarray:
    return dataset("breast-cancer")[2][:4]


def _vec(ctx: ts.Context, values: np.ndarray) -> bytes:
    return bytes(ts.ckks_vector(ctx, np.asarray(values, float).tolist()).serialize())


def test_metadata_states_parameters_keys_layouts_features_outputs(service: HEService) -> None:
    meta = service.metadata(MODEL)
    assert meta["parameters"]["poly_modulus_degree"] == 8192
    assert meta["parameters"]["coeff_mod_bit_sizes"] == [60, 40, 60]
    assert meta["parameters"]["security"]["bits"] == 128
    assert meta["keys"]["relin_keys"] is False
    assert set(meta["input"]["layouts"]) == {"vector", "batch"}
    assert len(meta["features"]) == 30
    assert meta["output"]["classes"] == ["malignant", "benign"]
    with pytest.raises(NotFoundError):
        service.metadata("nope")
    with pytest.raises(UnsupportedModelError, match="relu"):
        service.metadata("relu")


def test_vector_and_batch_round_trip(service: HEService, ctx: ts.Context, cid: str) -> None:
    plan = service.model(MODEL).compiled.plan
    x = _x()
    (out,) = service.infer("alice", MODEL, cid, "vector", [_vec(ctx, x[0])])
    assert (
        np.abs(np.array(ts.ckks_vector_from(ctx, out).decrypt()) - plan.forward(x[:1])[0]).max()
        < 1e-3
    )
    outs = service.infer("alice", MODEL, cid, "batch", [_vec(ctx, c) for c in x.T])
    got = np.array([ts.ckks_vector_from(ctx, o).decrypt() for o in outs]).T
    assert np.abs(got - plan.forward(x)).max() < 1e-3


def test_secret_key_context_is_refused(service: HEService, ctx: ts.Context) -> None:
    with pytest.raises(PermissionDeniedError, match="secret key"):
        service.register_context("alice", MODEL, ctx.serialize(save_secret_key=True))


def test_mismatched_and_malformed_contexts_are_refused(service: HEService) -> None:
    other = private_context(CKKSParams(8192, (60, 40, 40, 60)), False, False)
    with pytest.raises(InvalidRequestError, match="differ from the model's"):
        service.register_context("alice", MODEL, other.serialize(save_secret_key=False))
    no_scale = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    with pytest.raises(InvalidRequestError, match="global_scale"):
        service.register_context("alice", MODEL, no_scale.serialize(save_secret_key=False))
    with pytest.raises(InvalidRequestError, match="not a serialised TenSEAL context"):
        service.register_context("alice", MODEL, b"\x00" * 100)
    with pytest.raises(PayloadTooLargeError, match="limit"):
        service.register_context("alice", MODEL, b"\x00" * (context_size_limit(PARAMS) + 1))


def test_context_size_limit_holds_real_contexts() -> None:
    full = private_context(PARAMS, True, False)
    assert len(full.serialize(save_secret_key=False)) <= context_size_limit(PARAMS)


def test_context_ids_expire_and_belong_to_their_caller(
    service: HEService, ctx: ts.Context, cid: str, clock: Clock
) -> None:
    x = _vec(ctx, _x()[0])
    with pytest.raises(PermissionDeniedError, match="another caller"):
        service.infer("mallory", MODEL, cid, "vector", [x])
    with pytest.raises(NotFoundError, match="unknown context"):
        service.infer("alice", MODEL, "no-such-id", "vector", [x])
    clock.now += 61
    with pytest.raises(ExpiredError, match="expired"):
        service.infer("alice", MODEL, cid, "vector", [x])
    with pytest.raises(NotFoundError):  # gone after the expiry was reported
        service.infer("alice", MODEL, cid, "vector", [x])


def test_bad_ciphertexts_get_precise_errors(service: HEService, ctx: ts.Context, cid: str) -> None:
    x = _x()
    good = _vec(ctx, x[0])
    cases: list[tuple[list[bytes], str, str, type[FedvaultError]]] = [
        ([good[: len(good) // 2]], "vector", "not decodable as a CKKS vector", InvalidRequestError),
        ([b"random" * 100], "vector", "not decodable as a CKKS vector", InvalidRequestError),
        ([good, good], "vector", "takes 1 ciphertext", InvalidRequestError),
        ([good] * 3, "batch", "takes 30 ciphertext", InvalidRequestError),
        ([_vec(ctx, x[0][:29])], "vector", "holds 29 values", InvalidRequestError),
        ([_vec(ctx, np.ones(5000))], "vector", "at most 4096 values", PayloadTooLargeError),
        ([good], "sideways", "layout must be", InvalidRequestError),
        ([b"\x00" * 10_000_000], "vector", "limit", PayloadTooLargeError),
    ]
    for inputs, layout, message, cls in cases:
        with pytest.raises(cls, match=message):
            service.infer("alice", MODEL, cid, layout, inputs)
    cols = [_vec(ctx, c) for c in x.T]
    cols[3] = _vec(ctx, x[:3, 3])
    with pytest.raises(InvalidRequestError, match="same number of samples"):
        service.infer("alice", MODEL, cid, "batch", cols)
    # Encrypted under other parameters: refused on load, never evaluated.
    foreign = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    foreign.global_scale = 2**20
    with pytest.raises(InvalidRequestError, match="other parameters"):
        service.infer("alice", MODEL, cid, "vector", [_vec(foreign, x[0])])
    # A ciphertext at a lower level (already rescaled) is refused as not fresh.
    low = ts.ckks_vector(ctx, x[0].tolist()) * 1.0
    with pytest.raises(InvalidRequestError, match="fresh ciphertext"):
        service.infer("alice", MODEL, cid, "vector", [bytes(low.serialize())])


def test_fuzzed_ciphertexts_never_crash(service: HEService, ctx: ts.Context, cid: str) -> None:
    """Random and mutated bytes give a FedvaultError (or, if still valid, a result)."""
    rng = random.Random(4)
    good = _vec(ctx, _x()[0])
    blobs = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 400))) for _ in range(20)]
    for _ in range(40):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        blobs.append(bytes(data))
    for _ in range(10):
        cut = rng.randrange(1, len(good))
        blobs.append(good[:cut])
    messages = []
    for blob in blobs:
        try:
            service.infer("alice", MODEL, cid, "vector", [blob])
        except FedvaultError as exc:  # anything else fails the test
            messages.append(str(exc))
    assert messages
    assert all(m.startswith("input 0 ") for m in messages)
