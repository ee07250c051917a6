"""RFC 9457 problem+json for every HTTP front door, from the one error table.

Why here and not in each router: the mapping from a
:class:`~fedvault.errors.FedvaultError` to an HTTP status lives in
:data:`fedvault.errors.ERROR_TABLE`; every FastAPI app (the gateway, the audit
API, the HE API) installs these handlers once so a 400 looks the same
everywhere. Unexpected exceptions become a bare 500 whose body says nothing
about the cause: messages of unknown errors may carry data we must not leak;
they are logged here (type and stack, never the message) so they are not lost.

Every body also carries ``error``, the Open Inference Protocol's error member
(``{"error": "<message>"}``), equal to ``detail``: RFC 9457 allows extension
members, and OIP clients (stock ``tritonclient``) read only ``error`` — without
it they report a ``KeyError`` instead of the server's message.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from fedvault.errors import (
    FedvaultError,
    InvalidRequestError,
    NotFoundError,
    mapping_for,
    problem_type,
)

__all__ = [
    "PROBLEM_JSON",
    "Problem",
    "install_problem_handlers",
    "problem_response",
    "problem_responses",
    "unexpected_error",
]

PROBLEM_JSON = "application/problem+json"

_log = logging.getLogger(__name__)


class Problem(BaseModel):
    """RFC 9457 problem details, as every fedvault HTTP error body."""

    type: str
    title: str
    status: int
    detail: str
    error: str = Field(description="The Open Inference Protocol's error message (equal to detail).")


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for ``codes``, each a problem+json :class:`Problem`.

    Routes declare the errors they can answer with this, so the generated
    document (and schemathesis, which checks answers against it) is accurate.
    """
    schema = Problem.model_json_schema()  # inline: valid in any app, mounted or alone
    return {
        code: {
            "description": _REASONS.get(code, "Error"),
            "content": {PROBLEM_JSON: {"schema": schema}},
        }
        for code in codes
    }


_REASONS = {
    400: "Invalid request",
    401: "Missing, unknown, revoked or expired API key",
    403: "Not allowed for this key's role or grants",
    404: "No such model, version, run, key or context",
    409: "Conflicts with the current state",
    410: "Expired (e.g. a registered HE context)",
    413: "Request body too large",
    422: "Well-formed but unusable (e.g. a model that cannot run under HE)",
    429: "Rate limit exceeded (see Retry-After)",
    503: "Unavailable (e.g. the audit log cannot record the request)",
    504: "Request took longer than the server allows",
}


def problem_response(
    error: FedvaultError, *, status: int | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The problem document for ``error``: status from the table, its message as detail.

    A 500 says only "internal error": such errors are ours, not the caller's,
    and their messages may name paths or internals (503/504 keep theirs, which
    tell the caller what to wait for). ``status`` overrides the table only for
    HTTP-level refusals the table has no class for (405), with their ``headers``.
    """
    status = status or mapping_for(error).http_status
    detail = "internal error" if status >= 500 and status not in (503, 504) else str(error)
    retry_after = getattr(error, "retry_after_s", None)  # RateLimitedError (429)
    extra = dict(headers or {})
    if retry_after:
        extra["Retry-After"] = str(math.ceil(retry_after))
    return JSONResponse(
        {
            "type": problem_type(type(error)),
            "title": _title(error),
            "status": status,
            "detail": detail,
            "error": detail,  # OIP's member: what tritonclient & co. show
        },
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=extra or None,
    )


def _title(error: FedvaultError) -> str:
    """The class's one-line summary; the root class's speaks to developers, not callers."""
    if type(error) is FedvaultError:
        return "Internal server error (the server's log has the request id)."
    return (type(error).__doc__ or "Error").splitlines()[0]


def unexpected_error(exc: BaseException, *, request_id: str | None = None) -> FedvaultError:
    """Log an exception outside the hierarchy; the error to answer it with (a bare 500).

    Why a log line: the caller only sees "internal error", so without it the
    cause of a 500 is lost. Why not ``exc_info``: an unknown exception's
    *message* may quote the request (``could not convert string to float:
    '…'``) or a secret, so only the class names of the chain and the stack
    frames (files, lines, source) are logged.
    """
    chain: list[dict[str, Any]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(chain) < 8:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        chain.append(
            {
                "type": f"{type(current).__module__}.{type(current).__qualname__}",
                "frames": [f"{f.filename}:{f.lineno} in {f.name}: {f.line or ''}" for f in frames],
            }
        )
        current = current.__cause__ or current.__context__
    _log.error(
        json.dumps(
            {
                "event": "unexpected_error",
                "error": chain[0]["type"],
                "request_id": request_id,
                "chain": chain,  # the raised exception, then its causes; no messages
            }
        )
    )
    return FedvaultError("internal error")


async def _fedvault_error(_: Request, exc: Exception) -> JSONResponse:
    return problem_response(exc if isinstance(exc, FedvaultError) else FedvaultError("error"))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        return problem_response(InvalidRequestError("invalid request"))
    where = ", ".join(
        ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        for err in exc.errors()
    )
    return problem_response(InvalidRequestError(f"invalid or missing parameter(s): {where}"))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no route, wrong method, unreadable body) as problems too."""
    code = getattr(exc, "status_code", 400)
    if code == 404:
        return problem_response(NotFoundError("no such endpoint"))
    if code == 405:
        allow = {k: v for k, v in (getattr(exc, "headers", None) or {}).items() if k == "Allow"}
        return problem_response(
            InvalidRequestError("method not allowed here"), status=405, headers=allow
        )
    return problem_response(InvalidRequestError("bad request"))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(
        unexpected_error(exc, request_id=request.headers.get("x-request-id", "")[:200] or None)
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app`` (routers cannot carry exception handlers)."""
    app.add_exception_handler(FedvaultError, _fedvault_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
