"""The HTTP side of the daemon's one port: requests with bodies, kept-alive connections and
streamed responses, beside the websockets.

The ``websockets`` server reads a handshake request and nothing after it, so it cannot take a
POST. Every connection on the port starts here instead (``serve(create_connection=...)``, the
factory websockets offers for this): its first request head is parsed with ``h11`` (the
sans-I/O HTTP/1.1 state machine httpx and uvicorn build on); a websocket upgrade is handed,
bytes and all, to the ``websockets`` connection that would have served it anyway, and any other
request is served here: read up to its size limit, answered by the daemon's ``handler``, and the
connection kept alive for the next one. Websocket traffic never passes through this module
after the handshake, and the websocket implementation stays the ``websockets`` library's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import h11
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers

__all__ = ["HttpConnection", "HttpLimits", "HttpSide", "Request", "Response", "text_response"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP request may take: its body, its head, and the time to send it."""

    max_body_bytes: int = 25 * 1024 * 1024  # OpenAI's own limit on an uploaded file
    max_head_bytes: int = 16 * 1024
    receive_timeout_s: float = 60.0  # the whole request, head and body
    idle_timeout_s: float = 30.0  # a kept-alive connection with no request in flight
    max_connections: int = 64  # HTTP connections at once (not yet upgraded); past it: 503 and close


@dataclass
class Request:
    method: str
    target: str  # path and query, as sent
    headers: Headers
    body: bytes = b""
    peer: str = ""  # the client's address

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> str:
        return urlsplit(self.target).query

    def arg(self, name: str, default: str | None = None) -> str | None:
        """A query parameter (the first, when repeated)."""
        return parse_qs(self.query).get(name, [default])[0]


@dataclass
class Response:
    """An HTTP response: ``body`` whole, or ``stream`` (chunks sent as they come: server-sent
    events)."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None


def text_response(status: HTTPStatus, text: str, headers: dict[str, str] | None = None) -> Response:
    return Response(int(status), text.encode(), headers=dict(headers or {}))


Handler = Callable[[Request], Awaitable[Response]]


class HttpSide:
    """The HTTP half of the port: the connection factory websockets' ``serve`` takes
    (``create_connection``) and the HTTP connections open now (for the daemon's shutdown)."""

    def __init__(self, handler: Handler, limits: HttpLimits) -> None:
        self.handler = handler
        self.limits = limits
        self.connections: set[HttpConnection] = set()

    def create_connection(self, *args, **kwargs) -> asyncio.Protocol:
        """Each connection starts as an :class:`HttpConnection` holding the websockets
        connection (built with websockets' own arguments) it may hand over to."""
        return HttpConnection(ServerConnection(*args, **kwargs), self)

    async def close(self, timeout: float) -> None:
        """Close idle connections now; let requests in flight finish within ``timeout``."""
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
        busy = [c.task for c in self.connections if c.task is not None]
        if busy:
            await asyncio.wait(busy, timeout=timeout)
        for conn in list(self.connections):
            conn.close()


class HttpConnection(asyncio.Protocol):
    """One client connection until it proves to be a websocket; then it is websockets'."""

    @property
    def protocol(self):  # (websockets.server.ServerProtocol)
        """The websockets connection's sans-I/O protocol: websockets' ``serve`` checks it is the
        one its ``select_subprotocol`` was called for, on the object ``create_connection`` made."""
        return self.websocket.protocol

    def __init__(self, websocket: ServerConnection, side: HttpSide) -> None:
        self.websocket = websocket
        self.side = side
        self.handler = side.handler
        self.limits = limits = side.limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()  # the bytes of the first request, kept for a handover
        self.first = True
        self.request: Request | None = None
        self.body = bytearray()
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost = False
        self.draining: int | None = None  # bytes of a refused body still to read and drop
        self.early = 0  # bytes received while a request was being answered

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.side.connections) >= self.limits.max_connections:
            self.lost = True  # (nothing more is read: the answer is the whole exchange)
            body = b"too many connections\n"
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            transport.close()
            return
        self.side.connections.add(self)
        self._arm(self.limits.idle_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self.lost:
            return
        if self.draining is not None:
            self._drain(len(data))
            return
        if self.first:
            self.received += data
        self.h11.receive_data(data)
        if self.task is not None:  # a pipelined request while one is answered: h11 keeps it
            self.early += len(data)
            if self.early > self.limits.max_head_bytes and self.transport is not None:
                self.transport.pause_reading()  # until the answer is out (_serve resumes it)
            return
        self._events()

    def eof_received(self) -> bool:
        """The client is done sending (it may half-close after its request): answer first, then
        close (h11 tells when)."""
        self.h11.receive_data(b"")
        if self.task is None:
            self._events()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.writable.set()
        self.side.connections.discard(self)
        self._disarm()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # nobody is waiting for the answer

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # --- requests ------------------------------------------------------------------------

    def _events(self) -> None:
        """Read what h11 can tell from the bytes so far; at most one request at a time."""
        while self.task is None and not self.lost:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if self._begin(event):
                    return
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > self.limits.max_body_bytes:
                    self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large(), drain=self._unread())
                    return
            elif isinstance(event, h11.EndOfMessage):
                assert self.request is not None
                self.request.body = bytes(self.body)
                self.body = bytearray()
                self._disarm()
                self.task = asyncio.get_running_loop().create_task(self._serve(self.request))
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _begin(self, event: h11.Request) -> bool:
        """A new request's head; ``True`` when this connection is no longer ours to read."""
        size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if size > self.limits.max_head_bytes:  # (h11 bounds only a head still arriving)
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "the request head is too large\n")
            return True
        headers = Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers])
        if "websocket" in headers.get("Upgrade", "").lower():
            if not self.first:
                self._refuse(HTTPStatus.BAD_REQUEST, "a websocket needs a connection of its own\n")
                return True
            self._hand_over()
            return True
        self.first = False
        self.received = bytearray()
        self._arm(self.limits.receive_timeout_s)
        length = headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            waiting = self.h11.they_are_waiting_for_100_continue  # then it sends nothing more
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large(), drain=None if waiting else int(length))
            return True
        if self.h11.they_are_waiting_for_100_continue:
            self._write(h11.InformationalResponse(status_code=100, headers=[]))
        peer = self.transport.get_extra_info("peername") if self.transport else None
        self.request = Request(
            event.method.decode("ascii"), event.target.decode("latin-1"), headers, peer=str(peer[0]) if peer else ""
        )
        return False

    def _too_large(self) -> str:
        return f"the request body is over the limit of {self.limits.max_body_bytes} bytes\n"

    def _hand_over(self) -> None:
        """The websocket's from here: websockets gets the transport and every byte so far."""
        assert self.transport is not None
        self._disarm()
        self.side.connections.discard(self)
        ws, data = self.websocket, bytes(self.received)
        self.transport.set_protocol(ws)
        ws.connection_made(self.transport)
        ws.data_received(data)
        if not self.writable.is_set():
            ws.pause_writing()

    async def _serve(self, request: Request) -> None:
        try:
            response = await self.handler(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = text_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error: see the daemon's log\n")
        try:
            await self._send(request, response)
        except (ConnectionError, h11.LocalProtocolError) as exc:
            log.debug("response to %s not sent: %s", request.path, exc)
            self.close()
            return
        self.task = None
        if self.early:
            self.early = 0
            if self.transport is not None:
                self.transport.resume_reading()
        if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is h11.MUST_CLOSE:
            self.close()
            return
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:  # the client has not finished sending its request
            self.close()
            return
        self._arm(self.limits.idle_timeout_s)
        self._events()

    async def _send(self, request: Request, response: Response) -> None:
        defaults = [("Server", "streamd"), ("Cache-Control", "no-store"), ("Content-Type", response.content_type)]
        headers = _unique([*defaults, *response.headers.items()])
        if response.stream is None:
            headers.append(("Content-Length", str(len(response.body))))
        self._write(h11.Response(status_code=response.status, headers=headers))
        if response.stream is None:
            if request.method != "HEAD" and response.body:
                self._write(h11.Data(data=response.body))
        else:
            async for chunk in response.stream:  # without a length: chunked
                await self.writable.wait()
                self._write(h11.Data(data=chunk))
        self._write(h11.EndOfMessage())

    def _write(self, event) -> None:
        if self.lost or self.transport is None:
            raise ConnectionResetError("client went away")
        data = self.h11.send(event)
        if data:
            self.transport.write(data)

    def _refuse(self, status: HTTPStatus, text: str, drain: int | None = None) -> None:
        """Answer before the request is read (too large, malformed), then close. ``drain``: bytes
        the client is still sending: they are read and dropped first (up to twice the body
        limit), since a client that is still writing when the connection closes under it sees a
        reset, not the answer (httpx reads the answer only once its request is sent)."""
        self._disarm()
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                body = text.encode()
                self._write(
                    h11.Response(
                        status_code=int(status),
                        headers=[
                            ("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))),
                            ("Connection", "close"),
                            ("Server", "streamd"),
                        ],
                    )
                )
                self._write(h11.Data(data=body))
                self._write(h11.EndOfMessage())
            except (h11.LocalProtocolError, ConnectionError):
                pass
        if drain is not None and 0 < drain <= 2 * self.limits.max_body_bytes and not self.lost:
            self.draining = drain
            self._arm(self.limits.receive_timeout_s)
            return
        self.close()

    def _unread(self) -> int:
        """Bytes of the current body not read yet: what Content-Length promised, else as much
        again as the limit (a chunked body says nothing of its length)."""
        assert self.request is not None
        length = self.request.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else 2 * self.limits.max_body_bytes
        return max(0, total - len(self.body))

    def _drain(self, n: int) -> None:
        assert self.draining is not None
        self.draining -= n
        if self.draining <= 0:
            self.close()

    def _fail(self, exc: h11.RemoteProtocolError) -> None:
        status = HTTPStatus(exc.error_status_hint)
        self._refuse(status, f"bad request: {exc}\n")

    def close(self) -> None:
        self._disarm()
        self.side.connections.discard(self)
        if self.transport is not None and not self.lost:
            self.transport.close()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.draining is not None:
            self.close()
            return
        if self.task is not None:
            return
        if self.h11.their_state is h11.IDLE:
            self.close()  # no request begun (or only part of a head): nothing to answer
        else:
            self._refuse(HTTPStatus.REQUEST_TIMEOUT, "the request did not arrive in time\n")


def _unique(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers with each name once (the last value wins), in first-seen order."""
    seen: dict[str, tuple[str, str]] = {}
    for name, value in headers:
        seen[name.lower()] = (seen.get(name.lower(), (name, value))[0], value)
    return list(seen.values())
