"""gRPC mirrors: ``fedvault.AuditService`` and ``fedvault.EncryptedInferenceService``.

Through a real grpc.aio server on 127.0.0.1 with the gateway's real audit log,
key store and HE service (TenSEAL): the role matrix of every new RPC, the
error table's status codes, results equal to the REST/log answers, and an
audit record for every call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

from secure.client import HEKeys, decrypt_batch, encrypt_batch, params_from_metadata
from secure.signed_note import open_note, parse_checkpoint
from server.audit import merkle
from server.audit.records import AuditRecord, decode_entry
from server.gateway.pb import fedvault_extensions_pb2 as ext
from server.gateway.pb import fedvault_extensions_pb2_grpc as ext_grpc
from tests.gateway_support import (
    MODEL,
    OTHER,
    Harness,
    build,
    expected_logits,
    features,
    grpc_server,
)

ROLES = ("admin", "analyst", "partner", "auditor")
OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("gw-grpc-ext"))
    yield h
    h.log.close()


@pytest.fixture(scope="module")
def channel(harness: Harness) -> Iterator[grpc.Channel]:
    limit = 64 * 1024**2
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    with grpc_server(harness) as address, grpc.insecure_channel(address, options) as ch:
        yield ch


@pytest.fixture(scope="module")
def audit(channel: grpc.Channel) -> ext_grpc.AuditServiceStub:
    return ext_grpc.AuditServiceStub(channel)


@pytest.fixture(scope="module")
def he(channel: grpc.Channel) -> ext_grpc.EncryptedInferenceServiceStub:
    return ext_grpc.EncryptedInferenceServiceStub(channel)


def _md(h: Harness, who: str = "auditor") -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {h.tokens[who]}"),)


def _code(call: Callable[..., Message], request: Message, metadata: Any) -> grpc.StatusCode:
    try:
        call(request, metadata=metadata)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return OK


def _last(h: Harness) -> AuditRecord:
    size = h.log.size()
    ((_, entry),) = h.log.entries(size - 1, size)
    return decode_entry(entry)


def test_audit_rpcs_match_the_log(harness: Harness, audit: ext_grpc.AuditServiceStub) -> None:
    md = _md(harness)
    key = audit.PublicKey(ext.PublicKeyRequest(), metadata=md).verifier_key
    assert key == harness.log.signer.verifier.line
    note = audit.Checkpoint(ext.CheckpointRequest(), metadata=md).note
    cp = parse_checkpoint(open_note(note, harness.log.signer.verifier))
    assert cp.size >= 1
    rows = audit.Entries(ext.EntriesRequest(start=0, end=cp.size), metadata=md).entries
    assert [(r.index, r.entry) for r in rows] == harness.log.entries(0, cp.size)
    leaves = [merkle.leaf_hash(r.entry) for r in rows]
    assert merkle.reference_root(leaves) == cp.root
    proof = audit.InclusionProof(ext.InclusionProofRequest(index=0, tree_size=cp.size), metadata=md)
    assert (proof.index, proof.tree_size) == (0, cp.size)
    assert list(proof.hashes) == harness.log.inclusion_proof(0, cp.size)
    cons = audit.ConsistencyProof(ext.ConsistencyProofRequest(first=1, second=cp.size), metadata=md)
    assert list(cons.hashes) == harness.log.consistency_proof(1, cp.size)
    rec = _last(harness)
    assert (rec.action, rec.role, rec.outcome, rec.protocol) == (
        "grpc:ConsistencyProof",
        "auditor",
        "ok",
        "grpc",
    )
    assert rec.resource == "/fedvault.AuditService/ConsistencyProof"


def test_audit_errors_use_the_table(harness: Harness, audit: ext_grpc.AuditServiceStub) -> None:
    size = harness.log.size()
    past = ext.InclusionProofRequest(index=size + 5, tree_size=size + 10)
    assert _code(audit.InclusionProof, past, _md(harness)) == grpc.StatusCode.INVALID_ARGUMENT
    rec = _last(harness)
    assert (rec.status, rec.outcome) == ("INVALID_ARGUMENT", "error")
    assert rec.error_type == "urn:fedvault:problem:invalid-request"
    bad = ext.EntriesRequest(start=5, end=1)
    assert _code(audit.Entries, bad, _md(harness)) == grpc.StatusCode.INVALID_ARGUMENT


AUDIT_CALLS = [
    ("Checkpoint", ext.CheckpointRequest()),
    ("PublicKey", ext.PublicKeyRequest()),
    ("Entries", ext.EntriesRequest(start=0, end=1)),
    ("InclusionProof", ext.InclusionProofRequest(index=0, tree_size=1)),
    ("ConsistencyProof", ext.ConsistencyProofRequest(first=1, second=1)),
]


@pytest.mark.parametrize(("rpc", "request_"), AUDIT_CALLS, ids=[c[0] for c in AUDIT_CALLS])
def test_audit_role_matrix(
    harness: Harness, audit: ext_grpc.AuditServiceStub, rpc: str, request_: Message
) -> None:
    call = getattr(audit, rpc)
    for role in ROLES:
        expected = OK if role == "auditor" else DENIED
        assert _code(call, request_, _md(harness, role)) == expected, role
        rec = _last(harness)
        assert (rec.action, rec.role) == (f"grpc:{rpc}", role)
    for md in ((), _md(harness, "revoked"), (("authorization", "Bearer fvk_nope"),)):
        assert _code(call, request_, md) == grpc.StatusCode.UNAUTHENTICATED
        assert _last(harness).outcome == "denied"


def _he_calls(h: Harness) -> list[tuple[str, Message]]:
    return [
        ("ModelHEMetadata", ext.ModelHEMetadataRequest(model_id=MODEL)),
        ("RegisterContext", ext.RegisterContextRequest(model_id=MODEL, context=b"x")),
        ("DeleteContext", ext.DeleteContextRequest(context_id="unknown")),
        (
            "EncryptedInfer",
            ext.EncryptedInferRequest(
                model_id=MODEL, context_id="unknown", layout="batch", inputs=[b"x"]
            ),
        ),
    ]


def test_he_role_matrix(harness: Harness, he: ext_grpc.EncryptedInferenceServiceStub) -> None:
    """Analyst with a grant: the handler runs (its own answer); everyone else: refused."""
    handler_answer = {
        "ModelHEMetadata": OK,
        "RegisterContext": grpc.StatusCode.INVALID_ARGUMENT,  # b"x" is no context
        "DeleteContext": grpc.StatusCode.NOT_FOUND,
        "EncryptedInfer": grpc.StatusCode.NOT_FOUND,  # unknown context
    }
    for rpc, request_ in _he_calls(harness):
        call = getattr(he, rpc)
        for role in ROLES:
            expected = handler_answer[rpc] if role == "analyst" else DENIED
            assert _code(call, request_, _md(harness, role)) == expected, (rpc, role)
            rec = _last(harness)
            assert (rec.action, rec.role) == (f"grpc:{rpc}", role)
        # A grant for another model does not reach this one's HE endpoints.
        if rpc != "DeleteContext":
            assert _code(call, request_, _md(harness, "analyst-other")) == DENIED, rpc
        for md in ((), _md(harness, "expired")):
            assert _code(call, request_, md) == grpc.StatusCode.UNAUTHENTICATED, rpc
    empty = ext.ModelHEMetadataRequest(model_id="")
    code = _code(he.ModelHEMetadata, empty, _md(harness, "analyst"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_encrypted_inference_over_grpc(
    harness: Harness, he: ext_grpc.EncryptedInferenceServiceStub
) -> None:
    md = _md(harness, "analyst")
    meta = he.ModelHEMetadata(ext.ModelHEMetadataRequest(model_id=MODEL), metadata=md)
    doc = json.loads(meta.metadata_json)
    assert list(meta.features) == doc["features"]
    assert meta.parameters.poly_modulus_degree == doc["parameters"]["poly_modulus_degree"]
    assert len(meta.classes) == 2
    assert not meta.relin_keys_required  # logistic regression: no ciphertext products
    keys = HEKeys.create(params_from_metadata(doc), galois=False, relin=False)

    secret = ext.RegisterContextRequest(
        model_id=MODEL, context=bytes(keys.context.serialize(save_secret_key=True))
    )
    with pytest.raises(grpc.RpcError) as info:
        he.RegisterContext(secret, metadata=md)
    assert info.value.code() == DENIED
    assert "secret key" in (info.value.details() or "")

    reg = he.RegisterContext(
        ext.RegisterContextRequest(model_id=MODEL, context=keys.public_bytes()), metadata=md
    )
    assert list(reg.layouts) == ["batch"]
    x = features(5).astype(np.float64)
    inputs = encrypt_batch(keys, x)
    out = he.EncryptedInfer(
        ext.EncryptedInferRequest(
            model_id=MODEL, context_id=reg.context_id, layout="batch", inputs=inputs
        ),
        metadata=md,
    )
    assert (out.model_id, out.layout, len(out.outputs)) == (MODEL, "batch", 2)
    logits = decrypt_batch(keys, list(out.outputs), len(x))
    ref = expected_logits(harness, "2", x.astype(np.float32))
    assert np.abs(logits - ref).max() < 1e-2

    rec = _last(harness)
    assert (rec.action, rec.resource, rec.status) == (
        "grpc:EncryptedInfer",
        f"model:{MODEL}/default",
        "OK",
    )
    assert rec.request_digest
    assert rec.response_digest
    raw = json.dumps(rec.to_json_dict())
    assert harness.tokens["analyst"] not in raw
    assert reg.context_id not in raw

    def infer(inputs: list[bytes], who: str = "analyst", layout: str = "batch") -> grpc.StatusCode:
        req = ext.EncryptedInferRequest(
            model_id=MODEL, context_id=reg.context_id, layout=layout, inputs=inputs
        )
        return _code(he.EncryptedInfer, req, _md(harness, who))

    corrupt = [b"\x00garbage" + inputs[0][8:64], *inputs[1:]]
    assert infer(corrupt) == grpc.StatusCode.INVALID_ARGUMENT
    assert _last(harness).error_type == "urn:fedvault:problem:invalid-request"
    assert infer(inputs[:3]) == grpc.StatusCode.INVALID_ARGUMENT  # too few columns
    assert infer(inputs, layout="vector") == grpc.StatusCode.INVALID_ARGUMENT  # no galois keys
    # Contexts belong to the key that registered them.
    harness.tokens["analyst-2"], _ = harness.gw.store.create_key(
        "analyst", models=frozenset({MODEL, OTHER})
    )
    assert infer(inputs, who="analyst-2") == DENIED
    delete = ext.DeleteContextRequest(context_id=reg.context_id)
    assert _code(he.DeleteContext, delete, _md(harness, "analyst-2")) == DENIED
    he.DeleteContext(delete, metadata=md)
    assert infer(inputs) == grpc.StatusCode.NOT_FOUND
