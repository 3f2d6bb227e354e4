"""One sender for every client: a client's :class:`~streamd.hub.Outbox` delivered over its
transport (a websocket, or a TCP ingest connection's newline-delimited JSON). A client whose
outbox overflows gets one ``slow_client`` error and is closed, and is counted the same way
whatever it connected with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from .hub import Message, Outbox
from .protocol import POLICY_VIOLATION, ProtocolError

__all__ = [
    "RenderingTransport",
    "StreamTransport",
    "TcpTransport",
    "Transport",
    "WebsocketTransport",
    "error_message",
    "start_sender",
]

log = logging.getLogger(__name__)


class Transport(Protocol):
    #: What a send raises when the peer has gone.
    gone: tuple[type[BaseException], ...]
    peer: str

    async def send(self, text: str) -> None:
        """One frame: text, or bytes where the protocol is a byte stream (Wyoming)."""

    async def close_slow(self) -> None:
        """Close after the ``slow_client`` error (or try to)."""


class WebsocketTransport:
    gone = (ConnectionClosed,)

    def __init__(self, ws: ServerConnection, grace_s: float) -> None:
        self.ws, self.grace_s = ws, grace_s
        self.peer = str(ws.remote_address)

    async def send(self, text: str) -> None:
        await self.ws.send(text)

    async def close_slow(self) -> None:
        self.ws.close_timeout = self.grace_s  # to deliver the error before the socket is dropped
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(POLICY_VIOLATION, "client too slow")


class StreamTransport:
    """A TCP connection's writer: each frame written as it is (Wyoming's encoded events)."""

    gone = (ConnectionError,)

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.peer = str(writer.get_extra_info("peername"))

    async def send(self, frame: bytes) -> None:
        self.writer.write(frame)
        await self.writer.drain()

    async def close_slow(self) -> None:
        """The connection is closed by its handler once the sender ends."""


class TcpTransport(StreamTransport):
    """Raw TCP ingest's replies: each message one line of JSON."""

    async def send(self, text: str) -> None:  # type: ignore[override]
        await super().send(text.encode() + b"\n")


class RenderingTransport:
    """A client of another wire protocol (OpenAI Realtime, Deepgram, Wyoming): each message of
    its outbox (a protocol v1 message, or an adapter's own ``{"control": ...}`` message) becomes
    that protocol's frames through ``render``, a sans-I/O object that sees them in the order they
    are sent. Rendering at send time keeps the outbox's rules (partials replaced, finals kept)
    the same for every protocol, and one renderer state in one order."""

    def __init__(self, inner: Transport, render: Callable[[dict], list]) -> None:
        self.inner, self.render = inner, render
        self.gone = inner.gone
        self.peer = inner.peer

    async def send(self, text: str) -> None:
        for frame in self.render(json.loads(text)):
            await self.inner.send(frame)

    async def close_slow(self) -> None:
        await self.inner.close_slow()


def start_sender(outbox: Outbox, transport: Transport, on_slow: Callable[[], None]) -> asyncio.Task:
    """Deliver ``outbox`` over ``transport`` until it closes; if it overflows, ``on_slow()``, one
    ``slow_client`` error, then close."""

    async def deliver() -> None:
        try:
            while (message := await outbox.get()) is not None:
                await transport.send(message.text)
        except transport.gone:
            return
        except asyncio.CancelledError:
            if not outbox.overflowed:
                raise
        if outbox.overflowed:
            on_slow()
            log.warning("client %s cut off: more than %d messages waiting", transport.peer, outbox.limit)
            err = ProtocolError("slow_client", f"more than {outbox.limit} finals waiting: reading too slowly", True)
            with contextlib.suppress(*transport.gone, TimeoutError):
                await asyncio.wait_for(transport.send(error_message(err).text), 1.0)
            await transport.close_slow()

    task = asyncio.create_task(deliver())
    outbox.on_overflow = task.cancel  # a send blocked on a full socket must not hide the overflow
    return task


def error_message(err: ProtocolError) -> Message:
    """An error outside any stream's numbering (before a source exists, or to one client)."""
    return Message("error", json.dumps({**err.message(), "seq": 0}))
