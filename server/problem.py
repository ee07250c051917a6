"""RFC 9457 problem+json for every HTTP front door, from the one error table.

Why here and not in each router: the mapping from a
:class:`~fedvault.errors.FedvaultError` to an HTTP status lives in
:data:`fedvault.errors.ERROR_TABLE`; every FastAPI app (the gateway, the audit
API, the HE API) installs these handlers once so a 400 looks the same
everywhere. Unexpected exceptions become a bare 500 whose body says nothing
about the cause: messages of unknown errors may carry data we must not leak.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fedvault.errors import FedvaultError, InvalidRequestError, mapping_for, problem_type

__all__ = [
    "PROBLEM_JSON",
    "Problem",
    "install_problem_handlers",
    "problem_response",
    "problem_responses",
]

PROBLEM_JSON = "application/problem+json"


class Problem(BaseModel):
    """RFC 9457 problem details, as every fedvault HTTP error body."""

    type: str
    title: str
    status: int
    detail: str


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


def problem_response(error: FedvaultError) -> JSONResponse:
    """The problem document for ``error``: status from the table, its message as detail.

    A 500 says only "internal error": such errors are ours, not the caller's,
    and their messages may name paths or internals (503/504 keep theirs, which
    tell the caller what to wait for).
    """
    status = mapping_for(error).http_status
    detail = "internal error" if status >= 500 and status not in (503, 504) else str(error)
    retry_after = getattr(error, "retry_after_s", None)  # RateLimitedError (429)
    return JSONResponse(
        {
            "type": problem_type(type(error)),
            "title": (type(error).__doc__ or "Error").splitlines()[0],
            "status": status,
            "detail": detail,
        },
        status_code=status,
        media_type=PROBLEM_JSON,
        headers={"Retry-After": str(math.ceil(retry_after))} if retry_after else None,
    )


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


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    return problem_response(FedvaultError("internal error"))


def install_problem_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app`` (routers cannot carry exception handlers)."""
    app.add_exception_handler(FedvaultError, _fedvault_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
