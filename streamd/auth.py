"""Who may talk to the daemon: the bearer token, the Host check and the Origin policy, as pure
functions of a request's headers and query (tested without sockets).

Without a token only loopback may talk to the daemon, and a page whose DNS name was rebound to
127.0.0.1 still sends its own name as ``Host``; with one, every request carries it (an
``Authorization: Bearer`` header, or ``?token=`` where a browser's websocket cannot set headers).
Browsers send ``Origin``: the page's own origin is allowed, and those configured; other sites'
pages may not drive a daemon on this machine.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

__all__ = ["AccessPolicy", "Refusal", "is_loopback_address"]


@dataclass(frozen=True)
class Refusal:
    status: HTTPStatus
    body: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AccessPolicy:
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()

    def check(self, headers: Mapping[str, str], query: str) -> Refusal | None:
        """Why a request with these headers and query string is refused, or ``None``."""
        if self.token is not None and not self._authorised(headers, query):
            return Refusal(
                HTTPStatus.UNAUTHORIZED,
                "a token is required: Authorization: Bearer ...\n",
                {"WWW-Authenticate": 'Bearer realm="streamd"'},
            )
        host = headers.get("Host", "")
        if self.token is None and not is_loopback_address(urlsplit(f"//{host}").hostname or ""):
            return Refusal(HTTPStatus.FORBIDDEN, f"unexpected Host {host!r}: use 127.0.0.1 or localhost\n")
        origin = headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return Refusal(HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed\n")
        return None

    def _authorised(self, headers: Mapping[str, str], query: str) -> bool:
        assert self.token is not None
        header = headers.get("Authorization", "")
        supplied = header[7:].strip() if header[:7].lower() == "bearer " else parse_qs(query).get("token", [""])[0]
        return hmac.compare_digest(supplied.encode(), self.token.encode())

    def origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/")
        if urlsplit(origin).netloc == host:
            return True
        return origin in self.allowed_origins


def is_loopback_address(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
