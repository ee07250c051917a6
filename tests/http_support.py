"""A server started the way fedvault's servers are (server.http_serving), and raw sockets.

:func:`guarded_server` runs an app through :func:`server.http_serving.http_config`
— the guarded protocol the gateway, ``he serve`` and ``audit serve`` use — in
a thread on a free loopback port, so the slow-client tests meet the real
connection guards. The socket helpers time how long the server keeps a
connection open.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from server.http_serving import ConnectionLimits, SignalFreeServer, http_config
from tests.he_support import free_port


@contextmanager
def guarded_server(app: object, limits: ConnectionLimits, **options: Any) -> Iterator[int]:
    """Serve ``app`` with ``limits`` on a free loopback port; yield the port.

    ``options`` go to uvicorn's config (e.g. ``ssl_certfile``/``ssl_keyfile``).
    """
    port = free_port()
    config = http_config(app, host="127.0.0.1", port=port, limits=limits, **options)
    server = SignalFreeServer(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and after how many seconds.

    Raises ``TimeoutError`` when the server still holds the connection after ``limit_s``.
    """
    start = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            sock.settimeout(max(0.01, limit_s - (time.monotonic() - start)))
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise TimeoutError(f"still open after {limit_s} s; got {data[:80]!r}") from None
    return data, time.monotonic() - start
