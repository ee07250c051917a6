"""A TLS reverse proxy that exposes only the SuperLink's Fleet API to partners.

Why it exists: Flower 1.41's ``flower-superlink`` serves its Fleet API
(``/v1/fleet/*``, what SuperNodes call), its Control API (``/v1/control/*``:
submit runs, register and unregister nodes — with no user authentication in
open-source Flower) and its Runtime API (``/v1/runtime/*``, what the ServerApp
and SuperExec call) on one HTTP host:port; the per-API address flags are
deprecated and ignored. Binding the SuperLink where partners can reach it
would hand every partner the Control API. So the operator binds the SuperLink
to loopback (or a private operator network) and runs this proxy on the
partner-facing address: it terminates TLS with the federation's server
certificate, forwards ``/v1/fleet/*`` to the SuperLink over TLS (verified
against the federation CA) with the request's headers intact — SuperNode
authentication is a signature in headers, checked by the SuperLink itself —
and answers everything else with 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.http_serving import ConnectionLimits, http_config, serve_until_signal

__all__ = ["FLEET_PREFIX", "build_app", "serve"]

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
# Hop-by-hop headers (RFC 9110 §7.6.1) and those httpx/uvicorn recompute.
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def build_app(upstream: str, ca_cert: Path, *, timeout_s: float = 120.0) -> Starlette:
    """The proxy as an ASGI app forwarding Fleet calls to ``https://{upstream}``."""
    verify = ssl.create_default_context(cafile=str(ca_cert))
    client = httpx.AsyncClient(
        base_url=f"https://{upstream}", verify=verify, timeout=timeout_s, http2=False
    )

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(FLEET_PREFIX) or ".." in path:
            return JSONResponse(
                {"error": "not found: only the Fleet API is served here"}, status_code=404
            )
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        try:
            upstream_response = await client.request(
                request.method,
                path,
                params=request.url.query or None,
                content=await request.body(),
                headers=headers,
            )
        except httpx.HTTPError as exc:
            log.warning("SuperLink unreachable for %s: %s", path, type(exc).__name__)
            return JSONResponse({"error": "SuperLink unavailable"}, status_code=503)
        out_headers = {k: v for k, v in upstream_response.headers.items() if k.lower() not in _DROP}
        return Response(
            upstream_response.content,
            status_code=upstream_response.status_code,
            headers=out_headers,
        )

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def serve(
    *,
    listen_host: str,
    listen_port: int,
    upstream: str,
    ca_cert: Path,
    certfile: Path,
    keyfile: Path,
    limits: ConnectionLimits | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, through the connection guards.

    This is the one fedvault server on a partner-facing network, so it gets
    the same header, idle and TLS-handshake deadlines and connection cap as
    the gateway (:mod:`server.http_serving`). The guards time only the
    client's side: a Fleet call the SuperLink takes long to answer is bounded
    by the upstream timeout of :func:`build_app`, not by them.
    """
    limits = limits or ConnectionLimits()
    config = http_config(
        build_app(upstream, ca_cert),
        host=listen_host,
        port=listen_port,
        limits=limits,
        ssl_certfile=str(certfile),
        ssl_keyfile=str(keyfile),
        server_header=False,
    )
    asyncio.run(serve_until_signal(config, limits))
