"""One error hierarchy for every fedvault process, and one table mapping it outward.

Every failure a user can cause or meet is a :class:`FedvaultError` subclass whose
name says what went wrong. Third-party exceptions (pydantic, sqlite3, grpc,
cryptography, TenSEAL) are translated into these at the edge where they occur,
so CLI, HTTP and gRPC front doors only ever map *this* tree, through
:data:`ERROR_TABLE` and :func:`mapping_for`.

Messages must never contain secrets, raw features or key material: they are
printed to terminals and written to logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class FedvaultError(Exception):
    """Root of every error fedvault raises on purpose."""


class ConfigError(FedvaultError):
    """A configuration value is missing, malformed or contradicts another."""


class DataError(FedvaultError):
    """A partner's data file does not satisfy the federation's schema.

    ``path``, ``line`` (1-based, the header is line 1) and ``column`` locate the
    first problem so partner IT can fix the file without guessing.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        where = ", ".join(
            part
            for part in (
                f"file {path}" if path is not None else "",
                f"line {line}" if line is not None else "",
                f"column {column!r}" if column is not None else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.line = line
        self.column = column


class PrivacyBudgetExceeded(FedvaultError):
    """A privacy charge would take a partner past its (ε, δ) budget."""


class SecurityError(FedvaultError):
    """Base for failures of keys, signatures, certificates or authentication."""


class KeyFileError(SecurityError):
    """A key file is missing, unreadable, malformed or too widely readable."""


class SigningKeyMismatchError(KeyFileError):
    """This process's audit signing key is not the key that signs the store's checkpoints.

    A misconfigured replica, not tampering: it refuses to start (CLI exit 5)
    or, found later, to sign — answered 503 so a balancer or client tries
    another replica.
    """


class IntegrityError(SecurityError):
    """Signed or authenticated-encrypted data failed verification (tampering)."""


class AuthenticationError(SecurityError):
    """The caller could not prove who it is."""


class PermissionDeniedError(SecurityError):
    """The caller is known but not allowed to do this."""


class InvalidRequestError(FedvaultError):
    """A request is malformed or its parameters are impossible (e.g. an undecodable ciphertext).

    Its first line is every such problem's ``title``, so it stays general: the
    ``detail`` names the field or input (a proof index past the tree, a body
    that is not JSON, a ciphertext that is not a CKKS vector for the context).
    """


class NotFoundError(FedvaultError):
    """A run, model, partner or other named object does not exist."""


class ConflictError(FedvaultError):
    """The request contradicts the current state (e.g. a run already finished)."""


class UnsupportedModelError(ConfigError):
    """A model cannot be served this way (e.g. a ReLU layer under homomorphic encryption)."""


class PayloadTooLargeError(FedvaultError):
    """A request body, context or ciphertext exceeds the size the server accepts."""


class ExpiredError(FedvaultError):
    """A named object existed but its lifetime is over (e.g. a registered HE context)."""


class RateLimitedError(FedvaultError):
    """The caller sent more requests than its rate allows; retry after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(FedvaultError):
    """A request took longer than the server allows it to run."""


class CheckpointError(FedvaultError):
    """A training checkpoint is missing or corrupt, so a run cannot resume."""


class UnavailableError(FedvaultError):
    """A service fedvault depends on (SuperLink, database) cannot be reached."""


class ProcessFailedError(FedvaultError):
    """A child process fedvault started (SuperLink, SuperNode, run) failed."""


@dataclass(frozen=True, slots=True)
class ErrorMapping:
    """How one error class surfaces at each front door."""

    exit_code: int
    http_status: int
    grpc_status: str  # a ``grpc.StatusCode`` member name; kept a string so
    # this module stays importable without grpc.


# Most specific classes first is not required: :func:`mapping_for` walks the MRO.
ERROR_TABLE: dict[type[FedvaultError], ErrorMapping] = {
    FedvaultError: ErrorMapping(1, 500, "INTERNAL"),
    ConfigError: ErrorMapping(2, 400, "INVALID_ARGUMENT"),
    DataError: ErrorMapping(3, 422, "INVALID_ARGUMENT"),
    PrivacyBudgetExceeded: ErrorMapping(4, 403, "RESOURCE_EXHAUSTED"),
    SecurityError: ErrorMapping(5, 403, "PERMISSION_DENIED"),
    KeyFileError: ErrorMapping(5, 500, "FAILED_PRECONDITION"),
    SigningKeyMismatchError: ErrorMapping(5, 503, "UNAVAILABLE"),
    IntegrityError: ErrorMapping(6, 422, "DATA_LOSS"),
    AuthenticationError: ErrorMapping(5, 401, "UNAUTHENTICATED"),
    PermissionDeniedError: ErrorMapping(5, 403, "PERMISSION_DENIED"),
    InvalidRequestError: ErrorMapping(2, 400, "INVALID_ARGUMENT"),
    NotFoundError: ErrorMapping(7, 404, "NOT_FOUND"),
    ConflictError: ErrorMapping(8, 409, "FAILED_PRECONDITION"),
    CheckpointError: ErrorMapping(9, 409, "FAILED_PRECONDITION"),
    UnsupportedModelError: ErrorMapping(2, 422, "FAILED_PRECONDITION"),
    PayloadTooLargeError: ErrorMapping(12, 413, "RESOURCE_EXHAUSTED"),
    ExpiredError: ErrorMapping(13, 410, "NOT_FOUND"),
    RateLimitedError: ErrorMapping(14, 429, "RESOURCE_EXHAUSTED"),
    DeadlineExceededError: ErrorMapping(15, 504, "DEADLINE_EXCEEDED"),
    UnavailableError: ErrorMapping(10, 503, "UNAVAILABLE"),
    ProcessFailedError: ErrorMapping(11, 500, "INTERNAL"),
}


def mapping_for(error: FedvaultError) -> ErrorMapping:
    """Return the mapping of the nearest class of ``error`` found in the table."""
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[FedvaultError]


PROBLEM_TYPE_PREFIX = "urn:fedvault:problem:"


def problem_type(cls: type[FedvaultError]) -> str:
    """The stable RFC 9457 ``type`` URI of an error class (``urn:fedvault:problem:not-found``).

    Here, next to the table, so servers (``server.problem``) and clients
    (``secure.client``) derive the same URI and map it back to the class.
    """
    slug = re.sub(r"(?<!^)(?=[A-Z])", "-", cls.__name__.removesuffix("Error")).lower()
    return PROBLEM_TYPE_PREFIX + slug


def error_for_problem_type(uri: str) -> type[FedvaultError]:
    """The class whose :func:`problem_type` is ``uri`` (:class:`FedvaultError` if none)."""
    for cls in ERROR_TABLE:
        if problem_type(cls) == uri:
            return cls
    return FedvaultError
