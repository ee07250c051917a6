"""Host names, ports and ``host:port`` addresses, checked before anything binds or dials.

One rule for the CLI's options, the kits' addresses and the servers' own
listen checks, so a typo is reported with the option it came from, not by a
socket call (``OverflowError``) or a child process (a usage dump).
"""

from __future__ import annotations

import ipaddress
import re

from fedvault.errors import ConfigError

__all__ = ["check_address", "check_host", "check_port"]

# Underscores are not in RFC 1123 host names but are in real ones (compose v1
# container names such as proj_superlink_1, SRV-style labels): accepted, so
# kits issued with such an address keep loading.
_DNS_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def check_port(port: int, what: str, *, allow_zero: bool = False) -> int:
    """Refuse a port outside 1-65535 before anything starts.

    Why here: a bad port otherwise fails deep inside a socket call
    (OverflowError) or a child process (a usage dump, exit 11), possibly after
    other processes were already started.
    """
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{what} {port} is not a port number ({low}-65535)")
    return port


def check_host(host: str, what: str, *, wildcard: bool = False) -> str:
    """Refuse a host that is neither an IP address nor a DNS name, before anything starts.

    The same rule binds sockets, dials SuperLinks and names hosts in
    certificates (``wildcard``: a leftmost ``*`` label, certificates only), so
    a typo is reported with the option it came from, not by a child process.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        if wildcard and labels[0] == "*" and len(labels) > 2:
            labels = labels[1:]
        if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
            raise ConfigError(
                f"{what} {host!r} is neither an IP address nor a DNS name "
                "(use the ASCII/punycode form for international names)"
            ) from None
    return host


def check_address(address: str, what: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) -> (host, port), or a ConfigError naming ``what``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} {address!r} must be host:port (port 1-65535)")
    host = host.removeprefix("[").removesuffix("]")
    check_host(host, what)
    return host, int(port)
