"""Fuzzing of what callers send the gateway: OIP REST bodies (JSON and the binary
tensor extension), gRPC ``ModelInferRequest`` messages, and TenSEAL contexts and
ciphertexts. Whatever arrives, the answer is a request or a 4xx-class error of
fedvault's hierarchy, never another exception (a 5xx) or a crash.

Bounded in CI (``FEDVAULT_FUZZ_EXAMPLES``, default 150 per property); longer
with ``python bench/fuzz.py``. The TenSEAL part runs in a child process: a
native library that crashed on hostile bytes would take the test runner with
it, and that crash is exactly what this test must report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedvault.errors import FedvaultError, mapping_for
from server.gateway.grpc_api import decode_infer_request
from server.gateway.pb import grpc_service_pb2 as pb
from server.gateway.tensors import InferRequest, decode_rest_request

EXAMPLES = int(os.environ.get("FEDVAULT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DATATYPES = ["FP32", "FP64", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "FP16", "X", ""]

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _tensor(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(st.lists(st.integers(-2, 5), min_size=0, max_size=3))
    item: dict[str, Any] = {
        "name": draw(st.sampled_from(["features", "age", "", "x" * 300])),
        "datatype": draw(st.sampled_from(DATATYPES)),
        "shape": shape if draw(st.booleans()) else draw(_JSON),
    }
    if draw(st.booleans()):
        item["data"] = draw(st.lists(_JSON, max_size=8) | _JSON)
    if draw(st.booleans()):
        item["parameters"] = draw(
            st.dictionaries(st.sampled_from(["binary_data_size", "x"]), _JSON, max_size=2)
        )
    return item


@st.composite
def _rest_body(draw: st.DrawFn) -> tuple[bytes, str | None]:
    doc: Any = {"inputs": draw(st.lists(_tensor(), max_size=3))}
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.lists(st.dictionaries(st.sampled_from(["name", "parameters"]), _JSON))
        )
    if draw(st.booleans()):
        doc = draw(_JSON)
    head = json.dumps(doc).encode()
    if draw(st.booleans()):  # byte-level damage
        cut = draw(st.integers(0, len(head)))
        head = head[:cut] + draw(st.binary(max_size=4)) + head[cut + draw(st.integers(0, 3)) :]
    if draw(st.booleans()):
        tail = draw(st.binary(max_size=64))
        length = draw(
            st.sampled_from([str(len(head)), str(len(head) + 1), "0", "-1", "²", "9" * 30])
        )
        return head + tail, length
    return head, None


def _refused_as_client_error(exc: FedvaultError) -> None:
    status = mapping_for(exc).http_status
    assert 400 <= status < 500, (type(exc).__name__, status, str(exc))


@FUZZ
@given(body=_rest_body(), version=st.sampled_from([None, "1", ""]))
def test_any_rest_body_decodes_or_is_a_client_error(
    body: tuple[bytes, str | None], version: str | None
) -> None:
    raw, header_length = body
    try:
        request = decode_rest_request("model", version, raw, header_length)
    except FedvaultError as exc:
        _refused_as_client_error(exc)
    else:
        assert isinstance(request, InferRequest)


@st.composite
def _grpc_request(draw: st.DrawFn) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="model")
    for _ in range(draw(st.integers(0, 3))):
        t = req.inputs.add()
        t.name = draw(st.sampled_from(["features", "age", "", "é" * 200]))
        t.datatype = draw(st.sampled_from(DATATYPES))
        t.shape.extend(draw(st.lists(st.integers(-3, 6), max_size=3)))
        kind = draw(st.sampled_from(["fp32", "int64", "bool", "bytes", "none"]))
        values = draw(st.lists(st.integers(-5, 5), max_size=12))
        if kind == "fp32":
            t.contents.fp32_contents.extend(float(v) for v in values)
        elif kind == "int64":
            t.contents.int64_contents.extend(values)
        elif kind == "bool":
            t.contents.bool_contents.extend(bool(v) for v in values)
        elif kind == "bytes":
            t.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=6), max_size=8)))
    if draw(st.booleans()):
        req.raw_input_contents.extend(draw(st.lists(st.binary(max_size=48), max_size=4)))
    return req


@FUZZ
@given(req=_grpc_request())
def test_any_grpc_request_decodes_or_is_a_client_error(req: pb.ModelInferRequest) -> None:
    try:
        request = decode_infer_request(req)
    except FedvaultError as exc:
        _refused_as_client_error(exc)
    else:
        assert isinstance(request, InferRequest)


_HE_CHILD = textwrap.dedent(
    """
    import json, random, sys
    import numpy as np
    import tenseal as ts
    from fedvault.errors import FedvaultError, mapping_for
    from fedvault.modelspec import ModelSpec, init_parameters
    from fedvault.stats import Scaler
    from secure.he.engine import CompiledModel
    from secure.he.plan import compile_plan
    from secure.he.service import _deserialise_context, _load_vector
    from tests.he_support import private_context

    examples = int(sys.argv[1])
    rng = random.Random(0)
    spec = ModelSpec(kind="logreg", n_features=3, n_classes=2)
    scaler = Scaler(mean=np.zeros(3), std=np.ones(3))
    compiled = CompiledModel(compile_plan(spec, init_parameters(spec, 0), scaler))
    ctx = private_context(compiled.params, False, False)
    public = bytes(ctx.serialize(save_secret_key=False))
    vector = bytes(ts.ckks_vector(ctx, [0.5, -1.0, 2.0]).serialize())
    _load_vector(ctx, compiled, vector, 0)  # the unmutated vector is accepted

    def mutate(blob: bytes) -> bytes:
        b = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(b)) if b else 0
            if op < 0.4 and b:
                b[i] ^= 1 << rng.randrange(8)
            elif op < 0.6:
                del b[i : i + rng.randint(1, 64)]
            elif op < 0.8:
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            else:
                b = b[: rng.randrange(len(b) + 1)]
        return bytes(b)

    outcomes = {"accepted": 0, "refused": 0}
    for kind, blob in [("context", public)] * (examples // 4) + [("vector", vector)] * examples:
        data = mutate(blob)
        try:
            if kind == "context":
                _deserialise_context(data)
            else:
                _load_vector(ctx, compiled, data, 0)
        except FedvaultError as exc:
            assert 400 <= mapping_for(exc).http_status < 500, (kind, type(exc).__name__)
            outcomes["refused"] += 1
        else:
            outcomes["accepted"] += 1
    print(json.dumps(outcomes))
    """
)


def test_mutated_tenseal_contexts_and_ciphertexts_are_refused_not_crashed() -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _HE_CHILD, str(EXAMPLES)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    # A negative return code is a signal: the native library crashed on hostile bytes.
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes["refused"] > 0
