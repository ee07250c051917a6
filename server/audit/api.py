"""REST API of the audit log, as an ``APIRouter`` the gateway mounts.

Exactly the endpoints of issue 6 — checkpoint and public key as text/plain,
entries and proofs as JSON with standard base64 — so that an auditor needs
nothing of ours to check the log, only HTTP, SHA-256 and Ed25519.

Authorisation seam: every route depends on :func:`require_auditor`, which
refuses by default (fail closed). The gateway wires its authentication in
with ``app.dependency_overrides[require_auditor] = <its dependency that
accepts role "auditor">``; ``fedvault audit serve`` (a loopback development
server) overrides it with a bearer-token check. Errors leave as RFC 9457
problem+json through :func:`server.problem.install_problem_handlers`, which
the app must install. The gateway's gRPC mirror (``fedvault.AuditService``,
:mod:`server.gateway.grpc_extensions`) calls the same
:class:`~server.audit.log.AuditLog` methods.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse

from fedvault.errors import AuthenticationError, PermissionDeniedError
from server.audit.log import AuditLog

__all__ = ["AUDITOR_ROLE", "bearer_token_auth", "create_audit_router", "require_auditor"]

AUDITOR_ROLE = "auditor"


def require_auditor() -> None:
    """Placeholder for the gateway's role check; refuses until it is overridden."""
    raise PermissionDeniedError(
        f"no authentication is wired in front of the audit API (role {AUDITOR_ROLE!r})"
    )


def bearer_token_auth(token: str | None) -> Callable[[Request], None]:
    """A stand-in for the gateway's auth in ``fedvault audit serve`` and tests.

    ``None`` accepts every caller: only for a loopback development server.
    """

    def check(request: Request) -> None:
        sent = request.headers.get("authorization", "")
        if token is not None and not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise AuthenticationError("missing or wrong bearer token")

    return check


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


NonNegative = Annotated[int, Query(ge=0)]


def create_audit_router(log: AuditLog) -> APIRouter:
    """Routes under ``/v2/audit`` reading from ``log``."""
    router = APIRouter(prefix="/v2/audit", tags=["audit"], dependencies=[Depends(require_auditor)])

    @router.get("/checkpoint", response_class=PlainTextResponse)
    def checkpoint() -> PlainTextResponse:
        """The latest signed checkpoint (C2SP tlog-checkpoint signed note)."""
        return PlainTextResponse(log.checkpoint(), media_type="text/plain; charset=utf-8")

    @router.get("/public-key", response_class=PlainTextResponse)
    def public_key() -> PlainTextResponse:
        """The verifier key line ``<name>+<hex id>+<base64 key>``."""
        return PlainTextResponse(
            log.signer.verifier.line + "\n", media_type="text/plain; charset=utf-8"
        )

    @router.get("/entries")
    def entries(start: NonNegative, end: NonNegative) -> dict[str, Any]:
        """Entries ``start <= index < end``, at most one page; fewer means ask again."""
        rows = log.entries(start, end)
        return {"entries": [{"index": i, "entry": _b64(e)} for i, e in rows]}

    @router.get("/proof/inclusion")
    def inclusion(index: NonNegative, tree_size: NonNegative) -> dict[str, Any]:
        hashes = log.inclusion_proof(index, tree_size)
        return {"index": index, "tree_size": tree_size, "hashes": [_b64(h) for h in hashes]}

    @router.get("/proof/consistency")
    def consistency(first: NonNegative, second: NonNegative) -> dict[str, Any]:
        hashes = log.consistency_proof(first, second)
        return {"first": first, "second": second, "hashes": [_b64(h) for h in hashes]}

    return router
