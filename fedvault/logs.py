"""Process logging for the long-running commands: human text, or one JSON object a line.

Why one module: every server (gateway, HE, audit, federation, node, fleet
proxy) must log the same way, so a log shipper (Vector, Promtail) can parse
all of them with one rule. ``--log-format json`` (or ``FEDVAULT_LOG_FORMAT=json``)
makes every record — ours and uvicorn's — a single line::

    {"timestamp": "2026-01-02T03:04:05.678Z", "level": "ERROR",
     "component": "fedvault.problem", "message": "...", "request_id": "..."}

Why no exception text: an exception's message may quote the request body or
a secret (the rule :func:`server.problem.unexpected_error` follows), so a
record's ``exc_info`` becomes ``exc_type`` (the class's qualified name) and
nothing else. Tracebacks are left out for the same reason: a frame's source
line is safe, but ``traceback.format_exception`` also prints the message.

Why context variables for the ids: the gateway's request id and the
coordinator's run id are known far from the code that logs (a registry, a
store), and passing them down every call would touch every signature. The
formatter reads :data:`request_id` and :data:`run_id` at format time, in the
logging caller's context; ``extra={"request_id": ...}`` overrides them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

__all__ = [
    "ENV_VAR",
    "JsonFormatter",
    "LogFormat",
    "configure_logging",
    "json_logging_enabled",
    "request_id",
    "run_id",
    "uvicorn_log_config",
    "with_request_id",
]

ENV_VAR: Final = "FEDVAULT_LOG_FORMAT"
"""The environment variable every long-running command's ``--log-format`` reads."""

request_id: ContextVar[str | None] = ContextVar("fedvault_request_id", default=None)
"""The request being served (the gateway's ``x-request-id``), for log records."""
run_id: ContextVar[str | None] = ContextVar("fedvault_run_id", default=None)
"""The training run being coordinated, for log records."""

_TEXT_FORMAT: Final = "%(message)s"  # what the commands printed before this module
_MARK: Final = "_fedvault_handler"  # set on the handler configure_logging installs
_UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
# Keys only the formatter sets: a message that is JSON never supplies them, so a
# logged value (say, a caller-chosen id) cannot pose as the request's own id.
_RESERVED: Final = frozenset(
    {"timestamp", "level", "component", "message", "request_id", "run_id", "exc_type"}
)


class LogFormat(StrEnum):
    """How a long-running process writes its log records."""

    text = "text"
    json = "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, with no payload or exception text.

    A message that is itself a JSON object (several fedvault loggers write
    ``json.dumps({"event": ...})``) has its keys merged into the record rather
    than kept as an escaped string, so a shipper can index them; ``message``
    becomes its ``event``, and it never supplies the formatter's own keys
    (timestamp, level, component, message, request and run ids, exc_type).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "component": record.name,
            "message": record.getMessage(),
        }
        if entry["message"].startswith("{"):
            with contextlib.suppress(ValueError):
                fields = json.loads(entry["message"])
                if isinstance(fields, dict):
                    entry["message"] = str(fields.get("event", "event"))
                    entry |= {k: v for k, v in fields.items() if k not in _RESERVED}
        for name, var in (("request_id", request_id), ("run_id", run_id)):
            value = getattr(record, name, None) or var.get()
            if value:
                entry[name] = str(value)
        if record.exc_info and record.exc_info[0] is not None:
            exc_type = record.exc_info[0]
            entry["exc_type"] = f"{exc_type.__module__}.{exc_type.__qualname__}"
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(
    log_format: LogFormat | str = LogFormat.text,
    level: int | str = logging.INFO,
    *,
    export: bool = False,
) -> None:
    """Install one stderr handler on the root logger, in ``log_format``; idempotent.

    Why the root logger: every fedvault logger and (with
    :func:`uvicorn_log_config`'s ``None``) uvicorn's propagate to it, so one
    handler formats them all. A handler from an earlier call is replaced, not
    doubled; handlers others installed are left alone. ``export`` also sets
    :data:`ENV_VAR`, so the fedvault processes a supervisor starts (``federation
    up``'s fleet proxy) log the same way.
    """
    fmt = LogFormat(str(log_format).lower())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt is LogFormat.json else logging.Formatter(_TEXT_FORMAT)
    )
    setattr(handler, _MARK, fmt)
    if export:
        os.environ[ENV_VAR] = fmt.value
    root = logging.getLogger()
    for old in [h for h in root.handlers if hasattr(h, _MARK)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if fmt is LogFormat.json:
        # Loggers uvicorn configured earlier in this process keep their own
        # handlers; send their records to the root instead.
        for name in _UVICORN_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
            # An earlier uvicorn.Config(log_level=...) in this process leaves its
            # level on them, and a dictConfig elsewhere (disable_existing_loggers
            # defaults to True) disables loggers it does not name: reset both, so
            # they follow the root until a server sets its own level again.
            logger.setLevel(logging.NOTSET)
            logger.disabled = False


def json_logging_enabled() -> bool:
    """Whether :func:`configure_logging` set JSON lines for this process."""
    return any(getattr(h, _MARK, None) is LogFormat.json for h in logging.getLogger().handlers)


def uvicorn_log_config() -> dict[str, Any] | None:
    """The ``log_config`` for a ``uvicorn.Config``: ``None`` under JSON logging.

    Why: uvicorn's default config gives its loggers their own text handlers
    and stops propagation, so their lines would bypass the JSON formatter.
    With ``None`` they propagate to the root handler. Text mode keeps
    uvicorn's default, so the human output is unchanged.
    """
    if json_logging_enabled():
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG


@contextlib.contextmanager
def with_request_id(value: str | None) -> Iterator[None]:
    """Set :data:`request_id` for the block (and whatever it awaits)."""
    token = request_id.set(value)
    try:
        yield
    finally:
        request_id.reset(token)
