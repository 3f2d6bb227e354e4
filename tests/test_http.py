"""The HTTP side of the port (streamd/http.py) over real sockets: bodies, keep-alive, streamed
answers, limits, and websocket upgrades handed to websockets untouched."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from streamd.http import HttpLimits, HttpSide, Request, Response


async def app(request: Request) -> Response:
    if request.path == "/echo":
        return Response(200, request.body, "application/octet-stream", {"X-Method": request.method})
    if request.path == "/events":

        async def chunks():
            for i in range(3):
                await asyncio.sleep(0.01)
                yield f"data: {i}\n\n".encode()

        return Response(200, content_type="text/event-stream", stream=chunks())
    if request.path == "/boom":
        raise RuntimeError("a handler bug")
    return Response(404, b"no\n")


@pytest.fixture
async def server():
    side = HttpSide(app, HttpLimits(max_body_bytes=1000, max_head_bytes=2048, receive_timeout_s=0.5,
                                    idle_timeout_s=0.5))  # fmt: skip

    async def websocket(ws) -> None:
        async for message in ws:
            await ws.send(f"echo {message}")

    async with serve(websocket, "127.0.0.1", 0, create_connection=side.create_connection) as s:
        s.side = side
        yield s


def port(server) -> int:
    return server.sockets[0].getsockname()[1]


async def exchange(server, data: bytes, until_closed: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(), 5) if until_closed else await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    return out


async def test_a_post_body_is_read_whole_and_answered(server):
    body = bytes(range(256)) * 3
    head = f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    out = await exchange(server, head.encode() + body)
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(body) and b"Server: streamd" in out


async def test_two_requests_on_one_kept_alive_connection_both_get_answers(server):
    body = b"hello"
    request = (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n" + body) * 2
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    writer.write(request)
    data = b""
    while data.count(b"hello") < 2:
        data += await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    assert data.count(b"HTTP/1.1 200 ") == 2 and data.count(b"X-Method: POST") == 2


async def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    writer.write_eof()  # as nc -N does
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"abc")


async def test_pipelined_requests_are_answered_in_order(server):
    requests = b"".join(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n" + f"{i:02d}".encode() for i in range(5)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    writer.write(requests + b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    bodies = [part.split(b"\r\n\r\n", 1)[1][:2] for part in out.split(b"HTTP/1.1 ")[1:6]]
    assert bodies == [f"{i:02d}".encode() for i in range(5)] and out.count(b"HTTP/1.1 404 ") == 1


async def test_a_chunked_body_is_read_like_any_other(server):
    out = await exchange(
        server,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"abcde")


async def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(server):
    out = await exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)
    assert out.startswith(b"HTTP/1.1 413 ") and b"1000 bytes" in out
    chunked = b"".join(b"64\r\n" + b"y" * 100 + b"\r\n" for _ in range(12)) + b"0\r\n\r\n"
    out = await exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert out.startswith(b"HTTP/1.1 413 ")  # no length given: counted as it arrives


async def test_a_client_that_expects_100_continue_is_told_to_go_on_or_refused_before_sending(server):
    """curl asks before sending a body over 1 MB: it gets 100 Continue, or the 413 at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100 ")
    writer.write(b"body")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ") and await reader.readexactly(4) == b"body"
    writer.close()
    out = await exchange(
        server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 413 ")  # at once, without waiting for a body that never comes


async def test_a_head_over_the_limit_and_garbage_are_refused(server):
    out = await exchange(server, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")
    out = await exchange(server, b"\x16\x03\x01 this is not http\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")


async def test_a_streamed_answer_arrives_chunked_piece_by_piece(server):
    out = await exchange(server, b"GET /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"text/event-stream" in head
    assert [f"data: {i}".encode() in body for i in range(3)] == [True] * 3


async def test_a_handler_that_fails_is_a_500_and_the_server_goes_on(server):
    out = await exchange(server, b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 500 ")
    out = await exchange(server, b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404 ")


async def test_a_request_that_stalls_is_answered_408_and_an_idle_connection_closed(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    out = await asyncio.wait_for(reader.read(), 5)
    assert out.startswith(b"HTTP/1.1 408 ")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # said nothing: closed without a word
    writer.close()
    assert not server.side.connections


async def test_a_websocket_on_the_same_port_is_websockets_own(server):
    async with connect(f"ws://127.0.0.1:{port(server)}/anything") as ws:
        await ws.send("hi")
        assert await ws.recv() == "echo hi"
    assert not server.side.connections  # handed over: no longer the HTTP side's


async def test_an_upgrade_after_a_plain_request_on_the_same_connection_is_refused(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert out.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 400 " in out and b"connection of its own" in out


async def test_a_client_gone_mid_stream_cancels_its_handler(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(100), 5)).startswith(b"HTTP/1.1 200 ")
    writer.transport.abort()  # gone before the last event
    for _ in range(100):
        if not server.side.connections:
            break
        await asyncio.sleep(0.02)
    assert not server.side.connections


async def test_connections_past_the_limit_get_503_and_those_within_it_are_served(server):
    server.side.limits = HttpLimits(max_connections=2, idle_timeout_s=5)
    held = [await asyncio.open_connection("127.0.0.1", port(server)) for _ in range(2)]
    await asyncio.sleep(0.05)
    refused = await exchange(server, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in refused
    for _, writer in held:  # a slot frees: the next one is served
        writer.close()
    await asyncio.sleep(0.05)
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    served = await exchange(server, request)
    assert served.startswith(b"HTTP/1.1 200") and served.endswith(b"hi")
