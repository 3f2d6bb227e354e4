"""The one sender, over real loopback sockets: a client that never reads is cut off with one
``slow_client`` error and counted, whether it came over TCP or a websocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from streamd.hub import Message, Outbox
from streamd.sender import TcpTransport, WebsocketTransport, start_sender

BIG = "x" * 65536  # a few of these fill a socket's buffers


def _final(i: int) -> Message:
    return Message("final", json.dumps({"type": "final", "seq": i, "text": BIG}))


async def _fill(outbox: Outbox, sender: asyncio.Task) -> None:
    """Finals until the outbox overflows (the client is not reading)."""
    for i in range(10_000):
        outbox.put(_final(i))
        await asyncio.sleep(0.001)
        if outbox.overflowed:
            break
    await asyncio.wait_for(sender, 10)


async def test_a_tcp_client_that_never_reads_gets_one_slow_client_error_and_is_counted():
    slow: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outbox = Outbox(4)
        await _fill(outbox, start_sender(outbox, TcpTransport(writer), lambda: slow.append(1)))
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    try:
        while not slow:
            await asyncio.sleep(0.05)
        client.settimeout(10)
        data = b""
        while chunk := await asyncio.to_thread(client.recv, 1 << 20):
            data += chunk
        lines = [json.loads(line) for line in data.decode().splitlines()]
        assert slow == [1]
        assert [m["code"] for m in lines if m["type"] == "error"] == ["slow_client"]
        assert lines[-1]["type"] == "error" and lines[-1]["fatal"] is True
    finally:
        client.close()
        server.close()
        await server.wait_closed()


async def test_a_websocket_client_that_never_reads_gets_one_slow_client_error_and_is_counted():
    slow: list[int] = []

    async def handler(ws) -> None:
        outbox = Outbox(4)
        await _fill(outbox, start_sender(outbox, WebsocketTransport(ws, 2.0), lambda: slow.append(1)))

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", max_size=None, max_queue=1, compression=None) as ws:
            while not slow:
                await asyncio.sleep(0.05)
            received = []
            with contextlib.suppress(ConnectionClosed):  # 1008 is not a normal close
                while True:
                    received.append(json.loads(await ws.recv()))
        assert slow == [1]
        assert [m["code"] for m in received if m["type"] == "error"] == ["slow_client"]
        assert ws.close_code == 1008
