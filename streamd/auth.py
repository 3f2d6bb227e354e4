"""Who may talk to the daemon: the bearer token, the Host check and the Origin policy, as pure
functions of a request's headers and query (tested without sockets).

Without a token only loopback may talk to the daemon, and a page whose DNS name was rebound to
127.0.0.1 still sends its own name as ``Host``; with one, every request carries it: an
``Authorization: Bearer`` header (``Token`` as Deepgram's SDKs send it), or, where a browser's
websocket cannot set headers, ``?token=`` or a websocket subprotocol as the clients of those
APIs offer it (OpenAI's ``openai-insecure-api-key.<token>``, Deepgram's ``token, <token>``).
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
        token = self.token.encode()
        return any(hmac.compare_digest(supplied.encode(), token) for supplied in _offered_tokens(headers, query))

    def origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/")
        if urlsplit(origin).netloc == host:
            return True
        return origin in self.allowed_origins


def _offered_tokens(headers: Mapping[str, str], query: str) -> list[str]:
    """Every token the request offers, wherever its client puts one."""
    offered = []
    scheme, _, value = _header(headers, "Authorization").strip().partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        offered.append(value.strip())
    offered += parse_qs(query).get("token", [])[:1]
    protocols = [p.strip() for p in _header(headers, "Sec-WebSocket-Protocol").split(",")]
    offered += [p.removeprefix(OPENAI_KEY_PROTOCOL) for p in protocols if p.startswith(OPENAI_KEY_PROTOCOL)]
    if "token" in protocols and protocols.index("token") + 1 < len(protocols):
        offered.append(protocols[protocols.index("token") + 1])
    return [t for t in offered if t]


OPENAI_KEY_PROTOCOL = "openai-insecure-api-key."  # what OpenAI's browser clients offer the key as


def _header(headers: Mapping[str, str], name: str) -> str:
    """One header's value, or its values joined (websockets' ``Headers`` raises on a repeated one)."""
    get_all = getattr(headers, "get_all", None)
    if get_all is not None:
        return ", ".join(get_all(name))
    return headers.get(name, "")


def is_loopback_address(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
