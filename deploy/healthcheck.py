"""Container healthcheck for the fedvault image (no curl in python:3.11-slim).

Why one script: every service runs the same image; each says what healthy
means through its environment. FEDVAULT_HEALTH_URL is fetched (TLS verified
against FEDVAULT_HEALTH_CA when given) and must answer 2xx;
FEDVAULT_HEALTH_TCP (host:port) must accept a connection. Exit 0 healthy,
1 not.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import urllib.request


def main() -> int:
    url = os.environ.get("FEDVAULT_HEALTH_URL")
    tcp = os.environ.get("FEDVAULT_HEALTH_TCP")
    try:
        if url:
            ca = os.environ.get("FEDVAULT_HEALTH_CA")
            ctx = ssl.create_default_context(cafile=ca) if ca else None
            if not url.startswith(("https://", "http://")):
                return 1
            with urllib.request.urlopen(url, context=ctx, timeout=4) as resp:  # noqa: S310
                return 0 if 200 <= resp.status < 300 else 1
        if tcp:
            host, _, port = tcp.rpartition(":")
            socket.create_connection((host, int(port)), timeout=4).close()
            return 0
    except (OSError, ValueError):
        return 1
    return 1  # a service without a declared check is not known to be healthy


if __name__ == "__main__":
    sys.exit(main())
