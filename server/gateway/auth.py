"""Who may do what: principals, the role policy, and per-key rate limits.

The policy is a table, not code scattered over handlers, so that the test
walking every endpoint × role × key state reads against one place. Least
privilege: a role gets only the actions listed; model-scoped actions also need
the model in the key's grants (analyst) or the partner in the model's lineage
(partner: metadata of the models it helped train). Admins manage models and
keys but cannot run inference; auditors read the audit log and metrics only.

Health probes (``/v2/health/*``, gRPC ServerLive/ServerReady) need no key:
load balancers call them, and they reveal nothing but up/down.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from fedvault.errors import AuthenticationError, PermissionDeniedError, RateLimitedError
from server.gateway.keys import ApiKey, KeyVerifier

__all__ = [
    "ROLE_ACTIONS",
    "Action",
    "Authenticator",
    "Principal",
    "RateLimiter",
    "authorize",
]


class Action(StrEnum):
    SERVER_METADATA = "server_metadata"
    MODEL_METADATA = "model_metadata"
    MODEL_READY = "model_ready"
    INFER = "infer"
    HE = "he"
    AUDIT_READ = "audit_read"
    METRICS = "metrics"
    MODELS_ADMIN = "models_admin"
    KEYS_ADMIN = "keys_admin"
    PARTNER_READ = "partner_read"


ROLE_ACTIONS: Final[dict[str, frozenset[Action]]] = {
    "admin": frozenset(
        {
            Action.SERVER_METADATA,
            Action.MODEL_METADATA,
            Action.MODEL_READY,
            Action.MODELS_ADMIN,
            Action.KEYS_ADMIN,
        }
    ),
    "analyst": frozenset(
        {
            Action.SERVER_METADATA,
            Action.MODEL_METADATA,
            Action.MODEL_READY,
            Action.INFER,
            Action.HE,
        }
    ),
    "partner": frozenset(
        {Action.SERVER_METADATA, Action.MODEL_METADATA, Action.MODEL_READY, Action.PARTNER_READ}
    ),
    "auditor": frozenset({Action.SERVER_METADATA, Action.AUDIT_READ, Action.METRICS}),
}
MODEL_SCOPED: Final = frozenset(
    {Action.MODEL_METADATA, Action.MODEL_READY, Action.INFER, Action.HE}
)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller (the key's facts plus where the call came from)."""

    key: ApiKey
    peer: str | None = None
    mtls_subject: str | None = None

    @property
    def key_id(self) -> str:
        return self.key.key_id

    @property
    def role(self) -> str:
        return self.key.role


def authorize(
    principal: Principal,
    action: Action,
    *,
    model: str | None = None,
    model_partners: Callable[[str], frozenset[str]] | None = None,
) -> None:
    """Raise :class:`PermissionDeniedError` unless ``principal`` may do ``action``."""
    if action not in ROLE_ACTIONS.get(principal.role, frozenset()):
        raise PermissionDeniedError(f"role {principal.role!r} may not {action.value}")
    if model is None or action not in MODEL_SCOPED or principal.role == "admin":
        return
    if principal.role == "partner":
        partners = model_partners(model) if model_partners is not None else frozenset()
        if principal.key.partner not in partners:
            raise PermissionDeniedError("this partner did not take part in training that model")
        return
    if "*" not in principal.key.models and model not in principal.key.models:
        raise PermissionDeniedError("this key has no grant for that model")


class RateLimiter:
    """Token bucket per key id: ``rate`` requests/s sustained, ``burst`` at once.

    In memory, per process: N gateway replicas allow N× the rate, which is the
    usual trade-off against a shared counter on the request path.
    """

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key_id: str) -> None:
        if self._rate <= 0:
            return
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                wait = (1.0 - tokens) / self._rate
                raise RateLimitedError(
                    f"rate limit of {self._rate:g} requests/s exceeded for this key",
                    retry_after_s=max(1.0, math.ceil(wait)),
                )
            self._buckets[key_id] = (tokens - 1.0, now)


BEARER: Final = "bearer "


class Authenticator:
    """``Authorization: Bearer <key>`` (REST header or gRPC metadata) → :class:`Principal`."""

    def __init__(self, verifier: KeyVerifier, limiter: RateLimiter) -> None:
        self.verifier = verifier
        self.limiter = limiter

    @staticmethod
    def token_from(header: str | None) -> str:
        if not header:
            raise AuthenticationError("missing Authorization: Bearer <API key>")
        if header[: len(BEARER)].lower() != BEARER:
            raise AuthenticationError("Authorization must use the Bearer scheme")
        token = header[len(BEARER) :].strip()
        if not token or len(token) > 256:
            raise AuthenticationError("malformed API key")
        return token

    def fast(self, header: str | None) -> tuple[str, ApiKey | None, bool]:
        """(token, key, hit): the cache-only step, safe on the event loop."""
        token = self.token_from(header)
        hit, key = self.verifier.cached(token)
        return token, key, hit

    def finish(
        self, key: ApiKey | None, *, peer: str | None, mtls_subject: str | None
    ) -> Principal:
        live = self.verifier.check_live(key)
        self.limiter.check(live.key_id)
        return Principal(live, peer, mtls_subject)

    def authenticate_sync(
        self, header: str | None, *, peer: str | None = None, mtls_subject: str | None = None
    ) -> Principal:
        token, key, hit = self.fast(header)
        if not hit:
            key = self.verifier.verify(token)
        return self.finish(key, peer=peer, mtls_subject=mtls_subject)
