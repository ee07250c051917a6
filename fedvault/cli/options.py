"""Command-line options shared by several command groups (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from fedvault.logs import ENV_VAR as LOG_FORMAT_ENV
from fedvault.logs import LogFormat

if TYPE_CHECKING:
    from fedvault.settings import FedvaultSettings
    from server.http_serving import ConnectionLimits

# Help texts go through Rich markup: an unescaped "[env FEDVAULT_HOME]" reads
# as a style tag and vanishes from --help.
HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help=escape("Federation state directory [env FEDVAULT_HOME].")),
]

# Connection guards of a server (server.http_serving.ConnectionLimits); None: the
# setting (FEDVAULT_HTTP_HEADER_TIMEOUT_S, ...) or its default.
HeaderTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--header-timeout",
        help=escape(
            "Seconds a client has to send a request's headers in full; a connection "
            "that sends nothing or half its headers is closed then [env "
            "FEDVAULT_HTTP_HEADER_TIMEOUT_S, default 10]."
        ),
    ),
]
IdleTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--idle-timeout",
        help=escape(
            "Seconds of client silence before an idle keep-alive connection or a "
            "stalled request body is closed [env FEDVAULT_HTTP_IDLE_TIMEOUT_S, default 5]."
        ),
    ),
]
MaxConnectionsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-connections",
        help=escape(
            "Open connections the server keeps; one more gets 503 and is closed "
            "[env FEDVAULT_MAX_CONNECTIONS, default 512]."
        ),
    ),
]


def connection_overrides(
    header_timeout: float | None, idle_timeout: float | None, max_connections: int | None
) -> dict[str, float | int | None]:
    """The settings overrides the three connection options make (None: not given)."""
    return {
        "http_header_timeout_s": header_timeout,
        "http_idle_timeout_s": idle_timeout,
        "max_connections": max_connections,
    }


def connection_limits(settings: FedvaultSettings) -> ConnectionLimits:
    """The connection guards ``settings`` ask for."""
    from server.http_serving import ConnectionLimits

    return ConnectionLimits(
        header_timeout_s=settings.http_header_timeout_s,
        idle_timeout_s=settings.http_idle_timeout_s,
        max_connections=settings.max_connections,
        grpc_idle_timeout_s=settings.grpc_idle_timeout_s,
        send_timeout_s=settings.http_send_timeout_s,
    )


# How a long-running command logs (fedvault.logs): one option, the same env var everywhere.
LogFormatOpt = Annotated[
    LogFormat,
    typer.Option(
        "--log-format",
        envvar=LOG_FORMAT_ENV,
        case_sensitive=False,
        help=escape(
            "Log records as human 'text' or 'json' (one object a line, for Loki or "
            "Elasticsearch) [env FEDVAULT_LOG_FORMAT, default text]."
        ),
    ),
]
