"""Serve an ASGI app with uvicorn, owning SIGINT/SIGTERM ourselves.

Why not ``uvicorn.run``: its ``capture_signals`` re-raises the signal once the
server has stopped, so a ``finally`` around it never runs on SIGTERM and
whatever the app owns (the HE evaluation pool's worker processes, say) is
orphaned. Here the signal only asks the server to exit; the caller's cleanup
then runs as on any normal return.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator

import uvicorn

from fedvault.addresses import check_port
from fedvault.errors import ConfigError

__all__ = ["SignalFreeServer", "check_bind", "serve_until_signal"]


class SignalFreeServer(uvicorn.Server):
    """uvicorn without its own signal capture (the caller owns shutdown)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def check_bind(host: str, port: int, what: str) -> None:
    """Refuse, before anything starts, a host:port this process cannot listen on.

    uvicorn meets a busy port deep in its start-up and exits the process;
    a plain bind probe says the same in one line, before any state is opened.
    """
    check_port(port, f"cannot listen for {what}: port", allow_zero=True)  # getaddrinfo wraps 70000
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot listen on {host!r}: not an address here ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}"
            ) from None


async def serve_until_signal(config: uvicorn.Config) -> None:
    """Serve until SIGINT or SIGTERM, let in-flight requests finish, then return."""
    server = SignalFreeServer(config)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if server.should_exit:  # a second Ctrl-C: stop waiting for in-flight requests
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        await server.serve()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
