"""Serve an ASGI app with uvicorn: our own signal handling, and connection guards.

Why not ``uvicorn.run``: its ``capture_signals`` re-raises the signal once the
server has stopped, so a ``finally`` around it never runs on SIGTERM and
whatever the app owns (the HE evaluation pool's worker processes, say) is
orphaned. Here the signal only asks the server to exit; the caller's cleanup
then runs as on any normal return.

Why a protocol of our own (:class:`GuardedHttpProtocol`): uvicorn bounds only
the wait *between* requests (``timeout_keep_alive``, armed once a response
is complete). A connection that sends nothing after connecting, or half of
its headers, or stops in the middle of a body, is never timed out — each
received byte even cancels the keep-alive timer — and nothing caps how many
connections are open, so slow clients can use up the process's file
descriptors. uvicorn's ``limit_concurrency`` does not help: it answers 503
only once a request's headers are complete, i.e. never to those clients. h11
has no timers either (its options bound sizes, not time). So the guards sit
in the protocol, where the parser's callbacks say when headers are complete
and a body is awaited: a header deadline, an idle timeout, and a connection
cap checked when the connection is accepted.

The same protocol tells the app what the client actually got when the
server, not the app, answered or lost the request (a malformed body's 400, a
stalled body's 408, a vanished client): :data:`SENT_BY_SERVER` and
:data:`CONNECTION_LOST` in the request's scope, read by the gateway's audit
middleware so the log records what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import signal
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fedvault.addresses import check_port
from fedvault.errors import ConfigError
from fedvault.logs import uvicorn_log_config

__all__ = [
    "CONNECTION_LOST",
    "GRPC_MAX_CONCURRENT_STREAMS",
    "SENT_BY_SERVER",
    "ConnectionLimits",
    "GuardedHttpProtocol",
    "SignalFreeServer",
    "check_bind",
    "grpc_connection_options",
    "guarded_protocol",
    "http_config",
    "serve_until_signal",
]

SENT_BY_SERVER: Final = "fedvault.sent_by_server"
"""Scope key: ``(status, body)`` of a response the server wrote itself, not the app's."""
CONNECTION_LOST: Final = "fedvault.connection_lost"
"""Scope key: ``True`` once the connection closed before the app's response was complete."""
GRPC_MAX_CONCURRENT_STREAMS: Final = 100
"""Concurrent RPCs on one gRPC connection (HTTP/2 streams); grpc core's default is unbounded."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How long a client may hold a connection without sending, and how many it may hold.

    ``header_timeout_s``: from the connection's accept (or a later request's
    first byte) to the end of that request's headers — a total, so a client
    sending one byte every few seconds cannot stretch it. ``idle_timeout_s``:
    the longest wait for the client's next bytes when some are expected —
    between requests on a kept-alive connection (uvicorn's keep-alive) and
    within a request body. ``max_connections``: open connections per server
    (REST and gRPC each); one more is refused. ``grpc_idle_timeout_s``: a gRPC
    connection with no RPC in flight for this long is closed (clients
    reconnect on their next call; channels are meant to live long, hence a
    longer default than HTTP's). ``send_timeout_s``: the longest a full send
    buffer may go without the client acknowledging a single byte, i.e. a
    client that stopped reading (its connection is aborted and the request
    counts as disconnected); a slow reader that keeps reading is never cut.
    """

    header_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0
    max_connections: int = 512
    grpc_idle_timeout_s: float = 300.0
    send_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "idle_timeout_s", "grpc_idle_timeout_s", "send_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        if self.max_connections < 1:
            raise ConfigError("max_connections must be at least 1")


def _plain_response(
    default_headers: list[tuple[bytes, bytes]], status: int, text: str, *extra: bytes
) -> bytes:
    """A complete ``Connection: close`` response with a short text body (as uvicorn's 400)."""
    body = text.encode("ascii")
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode("ascii")]
    lines += [name + b": " + value + b"\r\n" for name, value in default_headers]
    lines += [
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
        b"connection: close\r\n",
        *extra,
        b"\r\n",
        body,
    ]
    return b"".join(lines)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, an idle timeout and a cap.

    A connection over the cap gets an immediate 503 and is closed, before any
    state is kept for it. A request whose headers are not complete within the
    header timeout is closed (with a 408 if some of it arrived; silently if
    nothing did, like an expired keep-alive). A body with no bytes for the
    idle timeout gets a 408 (recorded in the scope under
    :data:`SENT_BY_SERVER`) and the connection is closed; the app then sees
    ``http.disconnect``. The subclasses :func:`guarded_protocol` makes set
    :attr:`limits`.
    """

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    _fv_refused: bool = False
    _fv_in_head: bool = False  # some of a request's head arrived, not all of it
    _fv_head_timer: asyncio.TimerHandle | None = None
    _fv_idle_timer: asyncio.TimerHandle | None = None
    _fv_send_timer: asyncio.TimerHandle | None = None
    _fv_send_mark: tuple[int, int] = (0, 0)  # (bytes acked, bytes buffered) when armed

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.server_state.connections) >= self.limits.max_connections:
            # Refused before super() registers it: nothing to clean up but the socket.
            self._fv_refused = True
            transport.write(
                _plain_response(
                    self.server_state.default_headers,
                    503,
                    "too many connections",
                    b"retry-after: 1\r\n",
                )
            )
            transport.close()
            return
        super().connection_made(transport)
        self._fv_arm_head(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._fv_refused:
            return
        self._fv_cancel_timers()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.scope[CONNECTION_LOST] = True  # type: ignore[typeddict-unknown-key]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._fv_refused:
            return
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._fv_idle_timer is not None:
            self._fv_idle_timer.cancel()
            self._fv_idle_timer = None
        if self._fv_awaiting_body():
            self._fv_arm_idle(self.limits.idle_timeout_s)

    def pause_writing(self) -> None:
        """The send buffer is full: the client must drain some of it each send timeout."""
        super().pause_writing()
        if self._fv_send_timer is None and not self._fv_refused:
            self._fv_arm_send()

    def _fv_arm_send(self) -> None:
        self._fv_send_mark = self._fv_send_progress()
        self._fv_send_timer = self.loop.call_later(
            self.limits.send_timeout_s, self._fv_send_expired
        )

    def resume_writing(self) -> None:
        if self._fv_send_timer is not None:
            self._fv_send_timer.cancel()
            self._fv_send_timer = None
        super().resume_writing()

    # -- parser callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._fv_in_head = True
        if self._fv_head_timer is None:  # a later request on a kept-alive connection
            self._fv_arm_head(self.limits.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._fv_in_head = False
        if self._fv_head_timer is not None:
            self._fv_head_timer.cancel()
            self._fv_head_timer = None
        super().on_headers_complete()

    # -- uvicorn hooks ------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """A parse error (e.g. a malformed chunked body): the app's request ends here."""
        self._fv_answer_for_app(400, msg)
        super().send_400_response(msg)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn's keep-alive timer takes whole seconds (an int setting); re-arm it
        # with ours.
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.limits.idle_timeout_s, self.timeout_keep_alive_handler
            )

    # -- the guards -----------------------------------------------------------------------
    # A timer that fires late because the loop was blocked does not mistake the
    # client for silent: asyncio and uvloop (libuv >= 1.45) both read pending
    # I/O before they run due timers, so bytes sent in time are seen first
    # (tests/test_http_connections.py blocks the loop to check).
    def _fv_arm_head(self, delay: float) -> None:
        self._fv_head_timer = self.loop.call_later(delay, self._fv_head_expired)

    def _fv_arm_idle(self, delay: float) -> None:
        self._fv_idle_timer = self.loop.call_later(delay, self._fv_idle_expired)

    def _fv_awaiting_body(self) -> bool:
        """Whether the server waits for more of a request body whose headers it has."""
        cycle = self.cycle
        return cycle is not None and cycle.more_body and not self._fv_in_head

    def _fv_head_expired(self) -> None:
        self._fv_head_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A pipelined request's head behind one still being answered: that
            # answer must not be cut off; the next deadline counts from here.
            self._fv_arm_head(self.limits.header_timeout_s)
            return
        if self._fv_in_head:
            self.transport.write(
                _plain_response(self.server_state.default_headers, 408, "request headers too slow")
            )
        self.transport.close()

    def _fv_idle_expired(self) -> None:
        self._fv_idle_timer = None
        if self.transport.is_closing() or not self._fv_awaiting_body():
            return
        if self.flow.read_paused:  # the app is not reading: not the client's delay
            self._fv_arm_idle(self.limits.idle_timeout_s)
            return
        text = "request body stalled"
        self._fv_answer_for_app(408, text)
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_plain_response(self.server_state.default_headers, 408, text))
        self.transport.close()

    def _fv_send_expired(self) -> None:
        """No byte of our answer left the buffer for a whole send timeout: abort.

        Progress, not a full drain, is what counts: a slow link reading a
        large answer keeps the buffer above its low-water mark for long, but
        shrinks it, and the timer is armed again. Abort, not close: a close
        would wait for the buffer to drain, which is exactly what this client
        does not let happen — and a transport already closing (a complete
        answer, then the keep-alive timeout) waits the same way, so it is
        aborted too. connection_lost then marks the request disconnected and
        wakes the app's pending send.
        """
        self._fv_send_timer = None
        acked, buffered = self._fv_send_progress()
        if acked > self._fv_send_mark[0] or buffered < self._fv_send_mark[1]:
            self._fv_arm_send()  # the client read some: it is slow, not gone
            return
        self.transport.abort()

    def _fv_send_progress(self) -> tuple[int, int]:
        """(bytes the client's TCP acknowledged, bytes still in our buffer).

        Why the kernel's count: uvloop hands a large write to libuv whole and
        reports its buffer as unchanged until all of it is sent, so the
        buffer alone shows no progress on a slow link. ``tcpi_bytes_acked``
        (Linux ≥ 4.1, ``struct tcp_info`` offset 120) does; elsewhere it
        reads 0 and only the buffer counts. A client that stopped reading
        answers zero-window probes, which acknowledge no new byte.
        """
        acked = 0
        sock = self.transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_INFO"):
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 128)
                if len(info) >= 128:
                    acked = struct.unpack_from("Q", info, 120)[0]
            except OSError:
                acked = 0
        return acked, self.transport.get_write_buffer_size()

    def _fv_answer_for_app(self, status: int, text: str) -> None:
        """Record, for the request in flight, that the server answered it with ``status``.

        The cycle then counts as disconnected at once: the app's next
        ``receive`` says so, and nothing it sends reaches the closing transport
        after this answer (uvicorn itself marks that only when the close
        completes, a loop iteration later).
        """
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.response_started:
            return
        response = _plain_response(self.server_state.default_headers, status, text)
        body = response.partition(b"\r\n\r\n")[2]
        cycle.scope[SENT_BY_SERVER] = (status, body)  # type: ignore[typeddict-unknown-key]
        cycle.disconnected = True
        cycle.message_event.set()

    def _fv_cancel_timers(self) -> None:
        for timer in (self._fv_head_timer, self._fv_idle_timer, self._fv_send_timer):
            if timer is not None:
                timer.cancel()
        self._fv_head_timer = self._fv_idle_timer = self._fv_send_timer = None


def guarded_protocol(
    limits: ConnectionLimits, base: type[GuardedHttpProtocol] = GuardedHttpProtocol
) -> type[GuardedHttpProtocol]:
    """``base`` bound to ``limits`` (uvicorn builds protocols from a class and its config)."""
    return type(base.__name__, (base,), {"limits": limits, "__module__": base.__module__})


def http_config(
    app: Any,
    *,
    host: str,
    port: int,
    limits: ConnectionLimits,
    protocol: type[GuardedHttpProtocol] = GuardedHttpProtocol,
    **options: Any,
) -> uvicorn.Config:
    """A uvicorn config serving ``app`` through the guarded protocol (no access log)."""
    options.setdefault("log_level", "warning")
    options.setdefault("access_log", False)
    options.setdefault("log_config", uvicorn_log_config())
    return uvicorn.Config(
        app, host=host, port=port, http=guarded_protocol(limits, protocol), **options
    )


def grpc_connection_options(limits: ConnectionLimits) -> list[tuple[str, int]]:
    """grpc core channel arguments for a server: the same guards for the gRPC door.

    grpc core has them all natively: a handshake deadline (its default is
    120 s) takes the header timeout, idle connections close after
    ``grpc_idle_timeout_s``, ``max_allowed_incoming_connections`` caps
    connections, and keepalive pings find peers that vanished without a FIN.
    """
    return [
        ("grpc.server_handshake_timeout_ms", round(limits.header_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", round(limits.grpc_idle_timeout_s * 1000)),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_concurrent_streams", GRPC_MAX_CONCURRENT_STREAMS),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


class SignalFreeServer(uvicorn.Server):
    """uvicorn without its own signal capture (the caller owns shutdown), and
    with a TLS handshake deadline.

    Why the deadline here: a TLS connection reaches the protocol (and its
    header timer and connection cap) only once its handshake is done, so a
    client that connects and never sends a ClientHello would hold a descriptor
    for asyncio's default of 60 s, whatever ``header_timeout_s`` says. uvicorn
    passes no ``ssl_handshake_timeout`` to ``loop.create_server`` and has no
    setting for it, so :meth:`startup` supplies one (the header timeout) for
    the duration of uvicorn's own start-up.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        http = self.config.http
        limits = getattr(http, "limits", None) if isinstance(http, type) else None
        if self.config.ssl is None or not isinstance(limits, ConnectionLimits):
            await super().startup(sockets=sockets)
            return
        loop = asyncio.get_running_loop()
        create_server = loop.create_server

        async def with_handshake_deadline(*args: Any, **kwargs: Any) -> asyncio.Server:
            kwargs.setdefault("ssl_handshake_timeout", limits.header_timeout_s)
            return await create_server(*args, **kwargs)

        # An instance attribute shadows the method for uvicorn's calls only
        # (asyncio's and uvloop's loop classes both allow it), then goes.
        loop.create_server = with_handshake_deadline  # type: ignore[method-assign]
        try:
            await super().startup(sockets=sockets)
        finally:
            del loop.create_server


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


async def serve_until_signal(
    config: uvicorn.Config, limits: ConnectionLimits | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, let in-flight requests finish, then return.

    ``config`` is served through :class:`GuardedHttpProtocol` with ``limits``
    (the defaults when None) unless it already names a guarded protocol: no
    fedvault HTTP server runs without the connection guards.
    """
    if not (isinstance(config.http, type) and issubclass(config.http, GuardedHttpProtocol)):
        config.http = guarded_protocol(limits or ConnectionLimits())
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
