"""Server-side console sessions and their CSRF tokens.

Why server-side (an opaque random id in the cookie) rather than a signed
token: logout and key revocation must end a session at once, and the cookie
then carries nothing but 256 random bits — never the API key, the role or
the key id. Sessions live in this process's memory: a restart signs everyone
out, and N gateway replicas need sticky routing for the console (stated in
the README). The store keys sessions by SHA-256 of the id so a dictionary
lookup does not compare secrets byte by byte.

CSRF: one random token per session (session-bound synchronizer token),
embedded in every state-changing form and compared in constant time; the
login form, which has no session yet, uses a double-submit cookie.
SameSite=Strict already keeps cross-site requests from carrying the cookie;
the token is the second, independent line.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from server.audit.verifier import VerifierState
from server.console.policy import ConsoleUser

__all__ = [
    "CSRF_FIELD",
    "LOGIN_CSRF_COOKIE",
    "SESSION_COOKIE",
    "ConsoleSession",
    "SessionStore",
    "VerifyOutcome",
    "same_token",
]

SESSION_COOKIE: Final = "__Host-fedvault-console"
"""``__Host-``: the browser accepts it only with Secure, Path=/ and no Domain."""
LOGIN_CSRF_COOKIE: Final = "__Host-fedvault-login-csrf"
CSRF_FIELD: Final = "csrf_token"


def same_token(sent: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing token never matches."""
    if not sent or not expected:
        return False
    return hmac.compare_digest(sent.encode(), expected.encode())


@dataclass(slots=True)
class VerifyOutcome:
    """What the last verification in this session found (shown on the audit page)."""

    ok: bool
    message: str
    failed_index: int | None
    tree_size: int | None
    previous_size: int | None
    at: float


@dataclass(slots=True)
class ConsoleSession:
    user: ConsoleUser
    csrf: str
    created: float
    last_used: float
    # The last checkpoint this session verified (with its leaves): the next
    # verification must be consistent with it, as `fedvault audit verify`'s state dir.
    verified: VerifierState | None = None
    last_outcome: VerifyOutcome | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class SessionStore:
    """Sessions by hashed id, with an idle and an absolute lifetime."""

    def __init__(
        self,
        *,
        idle_s: float = 1800.0,
        absolute_s: float = 8 * 3600.0,
        max_sessions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle = idle_s
        self._absolute = absolute_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: dict[bytes, ConsoleSession] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _digest(session_id: str) -> bytes:
        return hashlib.sha256(session_id.encode()).digest()

    def create(self, user: ConsoleUser) -> tuple[str, ConsoleSession]:
        """A new session; the id goes into the cookie and is not kept here."""
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        session = ConsoleSession(user, secrets.token_urlsafe(32), now, now)
        with self._lock:
            if len(self._sessions) >= self._max:
                self._expire(now)
            if len(self._sessions) >= self._max:  # still full: drop the oldest
                oldest = min(self._sessions, key=lambda d: self._sessions[d].created)
                del self._sessions[oldest]
            self._sessions[self._digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> ConsoleSession | None:
        if not session_id or len(session_id) > 128:
            return None
        now = self._clock()
        digest = self._digest(session_id)
        with self._lock:
            session = self._sessions.get(digest)
            if session is None:
                return None
            if now - session.last_used > self._idle or now - session.created > self._absolute:
                del self._sessions[digest]
                return None
            session.last_used = now
            return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._sessions.pop(self._digest(session_id), None)

    def drop_key(self, key_id: str) -> None:
        """End every session of ``key_id`` (its key was revoked or expired)."""
        with self._lock:
            for digest in [d for d, s in self._sessions.items() if s.user.key_id == key_id]:
                del self._sessions[digest]

    def _expire(self, now: float) -> None:
        for digest in [
            d
            for d, s in self._sessions.items()
            if now - s.last_used > self._idle or now - s.created > self._absolute
        ]:
            del self._sessions[digest]

    def __len__(self) -> int:
        return len(self._sessions)
