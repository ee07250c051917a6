"""The checked-in gRPC stubs are what ``make proto`` generates, and match tritonclient's wire."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from server.gateway import protogen
from server.gateway.pb import grpc_service_pb2 as pb
from tests.gateway_clients import fields

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_stubs_are_current(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path)
    assert written, "protoc wrote nothing"
    for path in written:
        checked_in = ROOT / protogen.PACKAGE_DIR / path.name
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{checked_in} is stale: run `make proto` and commit"
        )


def test_field_numbers_match_tritonclient() -> None:
    ours = {name: fields(desc) for name, desc in pb.DESCRIPTOR.message_types_by_name.items()}
    out = subprocess.run(
        [sys.executable, "-m", "tests.gateway_clients.triton_descriptor", json.dumps(list(ours))],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert json.loads(out.stdout) == ours
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
    ]
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming
    assert stream.server_streaming
    assert stream.input_type.full_name == "inference.ModelInferRequest"
    assert stream.output_type.full_name == "inference.ModelStreamInferResponse"


def test_fedvault_extension_services() -> None:
    from server.gateway.pb import fedvault_extensions_pb2 as ext

    services = {
        s.full_name: [m.name for m in s.methods] for s in ext.DESCRIPTOR.services_by_name.values()
    }
    assert services == {
        "fedvault.AuditService": [
            "Checkpoint",
            "PublicKey",
            "Entries",
            "InclusionProof",
            "ConsistencyProof",
        ],
        "fedvault.EncryptedInferenceService": [
            "ModelHEMetadata",
            "RegisterContext",
            "DeleteContext",
            "EncryptedInfer",
        ],
    }
