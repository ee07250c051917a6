"""How a command addresses a service: its base URL and the bearer credential it sends.

Both are checked before anything connects, so a typo is a configuration error
(exit 2) that names the option, rather than an outage (exit 10) reported by
the HTTP library — and so a credential pasted into either place never reaches
a terminal, a log or the wire in a form it was not meant for.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from fedvault.errors import ConfigError

__all__ = ["bearer_token", "check_service_url"]

_SCHEMES = ("http", "https")


def check_service_url(url: str, option_name: str) -> str:
    """``url`` if it is an http(s) base URL with a host and a valid port; else ConfigError.

    Userinfo (``https://user:secret@host/``) is refused outright: httpx would
    send it as Basic authentication, and every error message that names the
    URL would print the secret. The URL is quoted back only when it cannot
    hold a secret (no ``@``, ``?`` or ``#``), so even a malformed one stays unprinted.
    """
    # Quoted back only when it cannot carry a secret: no userinfo, no query
    # (``?api_key=…``), no fragment.
    shown = f" (got {url!r})" if not any(c in url for c in "@?#") else ""
    parts: SplitResult | None
    try:
        parts = urlsplit(url)
        _ = parts.port  # parsing the port is what raises for a bad one
    except ValueError:
        parts = None
    if "@" in url and (parts is None or "@" in parts.netloc or not parts.netloc):
        raise ConfigError(
            f"{option_name}: credentials in the URL are not accepted; "
            "use the token option or file instead"
        )
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ConfigError(f"{option_name} contains spaces or control characters{shown}")
    if parts is None:
        raise ConfigError(f"{option_name} is not a valid URL (check its host and port){shown}")
    if parts.scheme.lower() not in _SCHEMES or not url[len(parts.scheme) :].startswith("://"):
        raise ConfigError(
            f"{option_name} must be an http:// or https:// URL such as http://127.0.0.1:8080{shown}"
        )
    if not parts.hostname:
        raise ConfigError(f"{option_name} names no host{shown}")
    if parts.port == 0:
        raise ConfigError(f"{option_name}: port 0 cannot be connected to{shown}")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(f"{option_name} is a base URL: it takes no ?query or #fragment{shown}")
    import httpx

    try:
        httpx.URL(url)
    except httpx.InvalidURL:
        raise ConfigError(f"{option_name} is not a valid URL{shown}") from None
    return url


def bearer_token(data: bytes, path: Path, what: str) -> str:
    """The token held in ``data`` (read from ``path``), stripped; else ConfigError.

    Checked here because a header value must be ASCII: anything else used to
    surface as a Unicode traceback from the HTTP library once connected. The
    file's content is never quoted — it is a secret, or something pasted by
    mistake in its place.
    """
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"the {what} {path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"the {what} {path} is empty")
    if not all("!" <= ch <= "~" for ch in text):
        raise ConfigError(
            f"the {what} {path} does not hold a token (one line of printable ASCII, no spaces)"
        )
    return text
