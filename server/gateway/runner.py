"""Run both front doors in one event loop and stop them gracefully.

Why our own signal handling: uvicorn's ``serve()`` captures SIGINT/SIGTERM
and re-raises them once *it* has stopped, which would kill the process
before the gRPC server drained. Here one handler starts an orderly shutdown:
stop accepting, let in-flight REST requests and RPCs finish (up to
``grace_s``), then close the audit log, which commits whatever is queued.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedvault.errors import ConfigError
from server.gateway.grpc_api import GrpcTLS, drain_running, start_grpc_server
from server.gateway.rest import GatewayApp, create_rest_app
from server.http_serving import (
    ConnectionLimits,
    GuardedHttpProtocol,
    SignalFreeServer,
    check_bind,
    http_config,
)

__all__ = ["SWITCH_INTERVAL_S", "Listen", "check_listen", "run", "serve"]

SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    http_port: int
    grpc_port: int
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # mTLS on both doors when set
    grace_s: float = 10.0
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)  # both doors


def check_listen(listen: Listen) -> None:
    """Refuse, before anything starts, what would fail at bind or TLS set-up.

    Why up front: uvicorn and grpcio meet these deep in their start-up, after
    the audit log and the models are open, and report them as tracebacks
    (``OSError``, ``RuntimeError: Failed to bind``). A plain socket bind and
    an :class:`ssl.SSLContext` load say the same in one line.
    """
    if listen.http_port == listen.grpc_port != 0:  # 0: each gets its own free port
        raise ConfigError(f"the REST and gRPC ports are both {listen.http_port}; give two ports")
    for door, port in (("REST", listen.http_port), ("gRPC", listen.grpc_port)):
        check_bind(listen.host, port, door)
    if listen.tls_cert is not None and listen.tls_key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(listen.tls_cert, listen.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--tls-cert {listen.tls_cert} / --tls-key {listen.tls_key}: not a PEM "
                f"certificate and its private key ({_reason(exc)})"
            ) from None
        if listen.client_ca is not None:
            try:
                context.load_verify_locations(cafile=listen.client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"--client-ca {listen.client_ca}: not PEM CA certificates ({_reason(exc)})"
                ) from None


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else None) or str(
        getattr(exc, "reason", None) or type(exc).__name__
    )


class _MTLSHttpToolsProtocol(GuardedHttpProtocol):
    """The guarded HTTP protocol plus the verified client-certificate subject in the scope.

    uvicorn does not expose the TLS peer certificate to ASGI apps; the audit
    record needs it ("who": mTLS subject), so it rides in the scope under
    ``fedvault.mtls_subject``, set once per connection from the handshake.
    """

    _fv_subject: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        if cert:
            parts = [f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
            self._fv_subject = ",".join(parts)[:200] or None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._fv_subject is not None:
            self.scope["fedvault.mtls_subject"] = self._fv_subject  # type: ignore[typeddict-unknown-key]


async def serve(
    gw: GatewayApp,
    listen: Listen,
    *,
    on_started: Callable[[], None] | None = None,
    unaudited_for_benchmark: bool = False,
) -> None:
    """Serve REST and gRPC until SIGINT/SIGTERM, then drain and return."""
    # The audit writer thread hands every commit back to the event loop; with
    # CPython's default 5 ms GIL switch interval a busy loop makes it wait
    # that long per hand-off. 0.5 ms measured: see bench/gateway.py.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    tls = None
    if listen.tls_cert is not None and listen.tls_key is not None:
        tls = GrpcTLS(listen.tls_cert, listen.tls_key, listen.client_ca)
    grpc_server = await start_grpc_server(
        gw,
        f"{listen.host}:{listen.grpc_port}",
        tls=tls,
        unaudited_for_benchmark=unaudited_for_benchmark,
        connections=listen.connections,
    )
    # No access log (http_config's default): the audit log is the access log;
    # no paths or peers in two places.
    config = http_config(
        create_rest_app(gw, unaudited_for_benchmark=unaudited_for_benchmark),
        host=listen.host,
        port=listen.http_port,
        limits=listen.connections,
        protocol=_MTLSHttpToolsProtocol if tls and tls.client_ca else GuardedHttpProtocol,
        timeout_graceful_shutdown=int(listen.grace_s),
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
        ssl_ca_certs=str(tls.client_ca) if tls and tls.client_ca else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
    )
    http_server = SignalFreeServer(config)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        http_server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    http_task = asyncio.create_task(http_server.serve())
    while not http_server.started and not http_task.done():
        await asyncio.sleep(0.02)
    if on_started is not None and http_server.started:
        on_started()
    gw.codec.start()  # large-body codec workers, in the background: warm before they are needed
    try:
        await http_task  # returns after should_exit, once in-flight requests finished
    finally:
        await grpc_server.stop(listen.grace_s)  # refuses new RPCs, waits for running ones
        # Calls and streamed messages already started finish and are audited,
        # even when the grace period cut them (their work is never cancelled).
        await drain_running(gw.limits.request_timeout_s)
        if gw.he_service is not None:  # its process pool and /dev/shm spool (drained by now)
            await asyncio.to_thread(gw.he_service.close)
        await asyncio.to_thread(gw.codec.close)  # REST codec workers (idle by now)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(
    gw: GatewayApp,
    listen: Listen,
    *,
    on_started: Callable[[], None] | None = None,
    unaudited_for_benchmark: bool = False,
) -> None:
    """:func:`serve` on uvloop when installed (what ``uvicorn.run`` would pick)."""
    import importlib.util

    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(
        serve(gw, listen, on_started=on_started, unaudited_for_benchmark=unaudited_for_benchmark)
    )
