"""gRPC mirrors of the REST extensions: fedvault.AuditService, EncryptedInferenceService.

Why mirrors and not new services: the audit API (issue 6) and the HE
extension (issue 5 item 4) must be reachable from gRPC clients too, and a
mirror that calls the very objects the REST routers call —
:class:`~server.audit.log.AuditLog` reads and
:class:`~secure.he.service.HEService` — cannot drift from them in behaviour.
Authentication, the role policy (:func:`~server.gateway.auth.authorize`),
the audit record of every call, the time limit and the status codes of
:data:`fedvault.errors.ERROR_TABLE` come from
:class:`~server.gateway.grpc_api.AuditedServicer`, shared with the OIP RPCs.

Registered contexts belong to ``key:<key id>``, as on REST, so a context
registered over one protocol is usable over the other by the same key only.
Audit records carry SHA-256 of the protobuf messages, never contexts or
ciphertexts.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc

from fedvault.errors import FedvaultError, InvalidRequestError, NotFoundError, UnavailableError
from secure.he.service import HEService
from server.audit.log import AuditLog
from server.gateway.audit import AuditEvent
from server.gateway.auth import Action, Principal, authorize
from server.gateway.grpc_api import AuditedServicer
from server.gateway.pb import fedvault_extensions_pb2 as ext
from server.gateway.pb import fedvault_extensions_pb2_grpc as ext_grpc
from server.gateway.rest import GatewayApp

__all__ = ["AuditServicer", "EncryptedInferenceServicer", "add_extension_services"]

Context = grpc.aio.ServicerContext[Any, Any]


class AuditServicer(AuditedServicer, ext_grpc.AuditServiceServicer):
    """``GET /v2/audit/*`` over gRPC, role ``auditor``."""

    SERVICE = "fedvault.AuditService"

    def _log(self, principal: Principal) -> AuditLog:
        authorize(principal, Action.AUDIT_READ)
        if self.gw.audit_log is None:  # pragma: no cover - build_gateway always sets it
            raise UnavailableError("this gateway serves no audit log")
        return self.gw.audit_log

    async def Checkpoint(
        self, request: ext.CheckpointRequest, context: Context
    ) -> ext.CheckpointResponse:
        async def work(p: Principal, _: AuditEvent) -> ext.CheckpointResponse:
            log = self._log(p)
            return ext.CheckpointResponse(note=await asyncio.to_thread(log.checkpoint))

        return await self._handle("Checkpoint", request, context, work)

    async def PublicKey(
        self, request: ext.PublicKeyRequest, context: Context
    ) -> ext.PublicKeyResponse:
        async def work(p: Principal, _: AuditEvent) -> ext.PublicKeyResponse:
            return ext.PublicKeyResponse(verifier_key=self._log(p).signer.verifier.line)

        return await self._handle("PublicKey", request, context, work)

    async def Entries(self, request: ext.EntriesRequest, context: Context) -> ext.EntriesResponse:
        async def work(p: Principal, _: AuditEvent) -> ext.EntriesResponse:
            log = self._log(p)
            rows = await asyncio.to_thread(log.entries, request.start, request.end)
            return ext.EntriesResponse(entries=[ext.Entry(index=i, entry=e) for i, e in rows])

        return await self._handle("Entries", request, context, work)

    async def InclusionProof(
        self, request: ext.InclusionProofRequest, context: Context
    ) -> ext.InclusionProofResponse:
        async def work(p: Principal, _: AuditEvent) -> ext.InclusionProofResponse:
            log = self._log(p)
            hashes = await asyncio.to_thread(log.inclusion_proof, request.index, request.tree_size)
            return ext.InclusionProofResponse(
                index=request.index, tree_size=request.tree_size, hashes=hashes
            )

        return await self._handle("InclusionProof", request, context, work)

    async def ConsistencyProof(
        self, request: ext.ConsistencyProofRequest, context: Context
    ) -> ext.ConsistencyProofResponse:
        async def work(p: Principal, _: AuditEvent) -> ext.ConsistencyProofResponse:
            log = self._log(p)
            hashes = await asyncio.to_thread(log.consistency_proof, request.first, request.second)
            return ext.ConsistencyProofResponse(
                first=request.first, second=request.second, hashes=hashes
            )

        return await self._handle("ConsistencyProof", request, context, work)


class EncryptedInferenceServicer(AuditedServicer, ext_grpc.EncryptedInferenceServiceServicer):
    """The HE extension over gRPC, role ``analyst`` with a grant for the model."""

    SERVICE = "fedvault.EncryptedInferenceService"

    def _he(self) -> HEService:
        service = self.gw.he_service
        if not isinstance(service, HEService):  # pragma: no cover - registered only with HE
            raise UnavailableError("encrypted inference is not enabled on this gateway")
        return service

    def _owner(self, principal: Principal, event: AuditEvent, model_ref: str | None) -> str:
        """Authorise (per-model grant, by name) and return the owner of contexts.

        ``model_ref`` None: a call not about one model (DeleteContext); an
        empty ``model_id`` is refused, never treated as "no model to check".
        """
        if model_ref is not None and not 0 < len(model_ref) <= 200:
            authorize(principal, Action.HE)
            raise InvalidRequestError("model_id must be 1 to 200 characters")
        name = self._model_name(model_ref) if model_ref else None
        event.model = name
        authorize(principal, Action.HE, model=name)
        return f"key:{principal.key_id}"

    def _model_id(self, ref: str) -> str:
        """The model id a reference (id, or name at its default now) stands for;
        the reference itself when it names nothing (the service says so)."""
        try:
            return self.svc.repository.by_reference(ref).model_id
        except FedvaultError:
            return ref

    def _model_name(self, ref: str) -> str:
        """HE calls address a model by registry id or by name; grants are by name."""
        try:
            return self.svc.repository.by_model_id(ref).name
        except NotFoundError:
            return ref

    async def ModelHEMetadata(
        self, request: ext.ModelHEMetadataRequest, context: Context
    ) -> ext.ModelHEMetadataResponse:
        async def work(p: Principal, ev: AuditEvent) -> ext.ModelHEMetadataResponse:
            self._owner(p, ev, request.model_id)
            model_id = self._model_id(request.model_id)
            meta = await asyncio.to_thread(self._he().metadata, model_id)
            return _metadata_message(meta)

        return await self._handle(
            "ModelHEMetadata", request, context, work, metric_endpoint="he_metadata"
        )

    async def RegisterContext(
        self, request: ext.RegisterContextRequest, context: Context
    ) -> ext.RegisterContextResponse:
        async def work(p: Principal, ev: AuditEvent) -> ext.RegisterContextResponse:
            owner = self._owner(p, ev, request.model_id)
            model_id = self._model_id(request.model_id)
            out = await self._he().register_context_async(owner, model_id, request.context)
            return ext.RegisterContextResponse(
                context_id=out["context_id"],
                expires_in_s=float(out["expires_in_s"]),
                layouts=list(out["layouts"]),
            )

        return await self._handle(
            "RegisterContext", request, context, work, metric_endpoint="he_register_context"
        )

    async def DeleteContext(
        self, request: ext.DeleteContextRequest, context: Context
    ) -> ext.DeleteContextResponse:
        async def work(p: Principal, ev: AuditEvent) -> ext.DeleteContextResponse:
            owner = self._owner(p, ev, None)
            self._he().delete_context(owner, request.context_id)
            return ext.DeleteContextResponse()

        return await self._handle(
            "DeleteContext", request, context, work, metric_endpoint="he_delete_context"
        )

    async def EncryptedInfer(
        self, request: ext.EncryptedInferRequest, context: Context
    ) -> ext.EncryptedInferResponse:
        async def work(p: Principal, ev: AuditEvent) -> ext.EncryptedInferResponse:
            owner = self._owner(p, ev, request.model_id)
            model_id = self._model_id(request.model_id)
            outputs = await self._he().infer_async(
                owner, model_id, request.context_id, request.layout, list(request.inputs)
            )
            return ext.EncryptedInferResponse(
                model_id=request.model_id, layout=request.layout, outputs=outputs
            )

        return await self._handle(
            "EncryptedInfer", request, context, work, metric_endpoint="he_infer"
        )


def _metadata_message(meta: dict[str, Any]) -> ext.ModelHEMetadataResponse:
    """The typed essentials plus the full REST document (``metadata_json``)."""
    params = meta["parameters"]
    return ext.ModelHEMetadataResponse(
        model_id=meta["model_id"],
        parameters=ext.CKKSParameters(
            poly_modulus_degree=int(params["poly_modulus_degree"]),
            coeff_mod_bit_sizes=[int(b) for b in params["coeff_mod_bit_sizes"]],
            global_scale_bits=int(params["global_scale_bits"]),
            slots=int(params["slots"]),
        ),
        relin_keys_required=bool(meta["keys"]["relin_keys"]),
        features=list(meta["features"]),
        classes=list(meta["output"]["classes"]),
        context_bytes_limit=int(meta["limits"]["context_bytes"]),
        ciphertext_bytes_limit=int(meta["limits"]["ciphertext_bytes"]),
        metadata_json=json.dumps(meta, sort_keys=True, separators=(",", ":")),
    )


def add_extension_services(gw: GatewayApp, server: grpc.aio.Server) -> None:
    """Register the mirrors whose backing service this gateway has."""
    if gw.audit_log is not None:
        ext_grpc.add_AuditServiceServicer_to_server(AuditServicer(gw), server)  # type: ignore[no-untyped-call]
    if gw.he_service is not None:
        ext_grpc.add_EncryptedInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            EncryptedInferenceServicer(gw), server
        )
