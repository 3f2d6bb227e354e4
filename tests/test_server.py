"""The daemon on a loopback port: the real engine, real speech, real sockets, real bad clients."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import jiwer
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from whisper_normalizer.english import EnglishTextNormalizer

from streamd.server import Daemon, ServerConfig, file_chunks

from .conftest import reference

normalise = EnglishTextNormalizer()
# JFK live: the speech detector splits him at his one-second pauses, and "ask not", decoded
# alone, sometimes becomes "asked not to ask" (3 errors of 22 = 0.136; issue 18's short
# utterances). Any other error fails.
JFK_LIVE_WER = 0.15


@pytest.fixture
async def daemon(engine):
    d = Daemon(engine, ServerConfig(port=0, start_timeout_s=2.0, resume_s=1.0))
    await d.start()
    yield d
    await d.shutdown()


def url(d: Daemon, path: str) -> str:
    return f"ws://127.0.0.1:{d.port}{path}"


def start(source: str | None = None, **audio) -> str:
    msg = {"type": "start", "protocol": 1, "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, **audio}}
    if source:
        msg["source"] = source
    return json.dumps(msg)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def send_audio(ws, audio: np.ndarray, chunk_s: float = 0.1, speed: float | None = 8.0) -> None:
    """``speed`` times real time (None: as fast as the socket takes it)."""
    step = int(chunk_s * 16000)
    for i in range(0, len(audio), step):
        await ws.send(pcm16(audio[i : i + step]))
        await asyncio.sleep(chunk_s / speed if speed else 0)


async def receive_all(ws) -> list[dict]:
    out = []
    try:
        async for frame in ws:
            out.append(json.loads(frame))
    except ConnectionClosed:
        pass
    return out


async def get_json(d: Daemon, path: str) -> dict:
    """GET from the daemon off the event loop (the daemon runs on it)."""

    def get() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.port}{path}", timeout=10) as r:
            return json.load(r)

    return await asyncio.to_thread(get)


def finals_text(messages: list[dict]) -> str:
    return " ".join(m["text"] for m in messages if m["type"] == "final")


def wer(wav, text: str) -> float:
    return jiwer.wer(normalise(reference(wav)), normalise(text))


async def test_a_client_streams_speech_and_gets_finals_with_words(daemon, jfk, jfk_audio):
    async with connect(url(daemon, "/v1/stream")) as ws:
        await ws.send(start("room-1"))
        receiving = asyncio.create_task(receive_all(ws))
        await send_audio(ws, jfk_audio)
        await ws.send(json.dumps({"type": "stop"}))
        messages = await receiving
        assert ws.close_code == 1000
    ready = messages[0]
    assert ready["type"] == "ready" and ready["source"] == "room-1" and ready["model"] == "tiny.en"
    assert ready["devices"] == {"mel": "cpu", "encoder": "cpu", "decoder": "cpu"}
    assert messages[-1]["type"] == "end"
    seqs = [m["seq"] for m in messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    kinds = {m["type"] for m in messages}
    assert {"partial", "final", "vad"} <= kinds and "error" not in kinds
    assert wer(jfk, finals_text(messages)) <= JFK_LIVE_WER, finals_text(messages)
    stats = daemon.scheduler.stats
    assert stats.mel_s > 0 and stats.window_mel_s > 0  # windows were cut from mel computed ahead
    assert daemon.engine.stage_seconds["encoder"] > 0
    finals = [m for m in messages if m["type"] == "final"]
    assert [f["segment"] for f in finals] == list(range(len(finals)))
    for f in finals:
        assert f["words"] and "".join(w["word"] for w in f["words"]).strip() == f["text"]
        assert f["start"] <= f["words"][0]["start"] <= f["words"][-1]["end"] <= f["end"] <= 11.5


async def test_viewers_see_the_same_finals_and_late_viewers_get_the_history(daemon, jfk_audio):
    async with connect(url(daemon, "/v1/captions?source=room-2")) as early:
        async with connect(url(daemon, "/v1/stream")) as ws:
            await ws.send(start("room-2", encoding="pcm_f32le", sample_rate=8000))  # resampled on the server
            owner = asyncio.create_task(receive_all(ws))
            audio8k = jfk_audio[::2].astype("<f4")
            for i in range(0, len(audio8k), 800):
                await ws.send(audio8k[i : i + 800].tobytes())
                await asyncio.sleep(0.01)
            # A viewer joining mid-stream gets the ready message and the finals so far. (At least
            # one: on a loaded machine the engine runs behind, and utterances that ended while it
            # was busy come out as one final; the last one ends only with the stop.)
            async with asyncio.timeout(120):
                while daemon.hub.sources["room-2"].finals < 1:
                    await asyncio.sleep(0.1)
            sources = (await get_json(daemon, "/v1/sources"))["sources"]
            assert sources[0]["id"] == "room-2" and sources[0]["kind"] == "websocket"
            async with connect(url(daemon, "/v1/captions?source=room-2")) as late:
                await ws.send(json.dumps({"type": "stop"}))
                owned = await owner
                late_messages = []
                while not late_messages or late_messages[-1]["type"] != "end":
                    late_messages.append(json.loads(await late.recv()))
        early_messages = []
        while not early_messages or early_messages[-1]["type"] != "end":
            early_messages.append(json.loads(await early.recv()))
    finals = [m for m in owned if m["type"] == "final"]
    assert finals and "country" in finals_text(owned)
    assert [m for m in early_messages if m["type"] == "final"] == finals
    assert [m for m in late_messages if m["type"] == "final"] == finals
    assert late_messages[0]["type"] == "ready" and late_messages[0]["session"] == owned[0]["session"]


async def test_bad_starts_are_refused_with_an_error_and_a_close_code(daemon):
    cases = [
        (b"\x00\x00", "bad_start", 1002),
        ("not json", "bad_start", 1002),
        (json.dumps({"type": "start", "audio": {"encoding": "mp3"}}), "unsupported_encoding", 1003),
    ]
    for first, code, close in cases:
        async with connect(url(daemon, "/v1/stream")) as ws:
            await ws.send(first)
            error = json.loads(await ws.recv())
            assert error["type"] == "error" and error["code"] == code and error["fatal"] is True, error
            assert error["message"]
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == close
    async with connect(url(daemon, "/v1/stream")) as ws:  # no start at all
        error = json.loads(await ws.recv())
        assert error["code"] == "bad_start" and "no start message" in error["message"]
    async with connect(url(daemon, "/v1/captions")) as ws:  # a viewer must name its source
        assert json.loads(await ws.recv())["code"] == "bad_request"
    assert (await get_json(daemon, "/healthz"))["status"] == "ok"


async def test_mistakes_mid_stream_are_reported_and_the_stream_goes_on(daemon, jfk, jfk_audio):
    async with connect(url(daemon, "/v1/stream")) as ws:
        await ws.send(start("room-3"))
        receiving = asyncio.create_task(receive_all(ws))
        half = len(jfk_audio) // 2
        await send_audio(ws, jfk_audio[:half], speed=None)
        await ws.send(b"\x01\x02\x03")  # odd-length PCM: one whole sample kept, one byte dropped
        await ws.send("this is not audio")  # text where audio is expected
        await ws.send(json.dumps({"type": "pause"}))  # an unknown message
        await send_audio(ws, jfk_audio[half:], speed=None)
        await ws.send(json.dumps({"type": "stop"}))
        messages = await receiving
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["bad_audio", "bad_message", "unknown_message"]
    assert not any(e["fatal"] for e in errors)
    assert messages[-1]["type"] == "end"
    assert wer(jfk, finals_text(messages)) <= 0.15, finals_text(messages)


async def test_an_oversize_frame_closes_with_1009_and_other_streams_go_on(engine, jfk, jfk_audio):
    d = Daemon(engine, ServerConfig(port=0, max_frame_bytes=32000))
    await d.start()
    try:
        async with connect(url(d, "/v1/stream")) as good, connect(url(d, "/v1/stream")) as bad:
            await good.send(start("good"))
            await bad.send(start("bad"))
            receiving = asyncio.create_task(receive_all(good))
            await bad.send(bytes(32002))
            messages = await receive_all(bad)
            assert [m["type"] for m in messages] == ["ready", "error", "end"]
            assert messages[1]["code"] == "frame_too_large" and messages[1]["fatal"]
            assert bad.close_code == 1009
            await send_audio(good, jfk_audio, speed=None)
            await good.send(json.dumps({"type": "stop"}))
            assert wer(jfk, finals_text(await receiving)) <= JFK_LIVE_WER
    finally:
        await d.shutdown()


async def test_an_abrupt_disconnect_mid_frame_still_finalises_for_viewers(daemon, jfk_audio):
    async with connect(url(daemon, "/v1/captions?source=drop")) as viewer:
        ws = await connect(url(daemon, "/v1/stream"))
        await ws.send(start("drop"))
        await send_audio(ws, jfk_audio[: 6 * 16000], speed=None)
        # Half of a frame header, then the TCP connection is torn down without a close frame.
        ws.transport.write(b"\x82\x7e")
        ws.transport.abort()
        messages = []
        while not messages or messages[-1]["type"] != "end":
            messages.append(json.loads(await asyncio.wait_for(viewer.recv(), 30)))
    assert "fellow americans" in normalise(finals_text(messages))
    assert "drop" not in daemon.hub.sources
    status = await get_json(daemon, "/healthz")
    assert status["status"] == "ok" and status["streams"] == []


async def test_a_source_id_in_use_is_refused(daemon):
    async with connect(url(daemon, "/v1/stream")) as first, connect(url(daemon, "/v1/stream")) as second:
        await first.send(start("twin"))
        assert json.loads(await first.recv())["type"] == "ready"
        await second.send(start("twin"))
        error = json.loads(await second.recv())
        assert error["code"] == "source_in_use"
        with pytest.raises(ConnectionClosed):
            await second.recv()
        assert second.close_code == 1008


async def test_a_slow_viewer_is_cut_off_without_delaying_anyone(engine):
    """A viewer that never reads: its socket fills, its outbox overflows, it gets cut off; a
    normal viewer of the same source receives every final."""
    d = Daemon(engine, ServerConfig(port=0, max_queue=64))
    await d.start()
    try:
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        slow.connect(("127.0.0.1", d.port))
        slow.sendall(
            b"GET /v1/captions?source=busy HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        async with connect(url(d, "/v1/captions?source=busy"), max_queue=None) as fast:
            await asyncio.sleep(0.2)
            source = d.hub.open("busy", "file")
            text = "x" * 4000
            for i in range(1000):  # 4 MB of finals, far more than the slow socket's buffers
                source.publish({"type": "final", "segment": i, "start": 0, "end": 0, "text": text, "words": []})
                await asyncio.sleep(0.001)
            d.hub.close(source)
            received = []
            while not received or received[-1]["type"] != "end":
                received.append(json.loads(await asyncio.wait_for(fast.recv(), 10)))
        assert [m["segment"] for m in received if m["type"] == "final"] == list(range(1000))
        assert d.metrics.slow_clients._value.get() == 1
        slow.settimeout(10)

        def read_all() -> bytes:
            data = b""
            while chunk := slow.recv(65536):
                data += chunk
            return data

        data = await asyncio.to_thread(read_all)  # the client finally reads what was sent
        assert b"slow_client" in data  # the error was delivered before the close
        slow.close()
    finally:
        await d.shutdown()


async def test_tcp_ingest_takes_raw_pcm_and_answers_json_lines(engine, jfk, jfk_audio):
    d = Daemon(engine, ServerConfig(port=0, tcp_port=0))
    await d.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", d.tcp_port)
        pcm = pcm16(jfk_audio)
        for i in range(0, len(pcm), 3001):  # odd sizes: samples split across reads
            writer.write(pcm[i : i + 3001])
            await writer.drain()
        writer.write_eof()
        lines = [json.loads(line) for line in (await asyncio.wait_for(reader.read(), 60)).splitlines()]
        writer.close()
    finally:
        await d.shutdown()
    assert lines[0]["type"] == "ready" and lines[0]["source"].startswith("tcp-")
    assert lines[-1]["type"] == "end"
    assert wer(jfk, finals_text(lines)) <= JFK_LIVE_WER


async def test_a_file_source_plays_to_viewers(engine, jfk, jfk_audio):
    d = Daemon(engine, ServerConfig(port=0))
    await d.start()
    try:
        async with connect(url(d, "/v1/captions?source=jfk")) as viewer:
            d.play("jfk", "file", file_chunks(jfk_audio, realtime=False))
            messages = []
            while not messages or messages[-1]["type"] != "end":
                messages.append(json.loads(await asyncio.wait_for(viewer.recv(), 60)))
    finally:
        await d.shutdown()
    assert wer(jfk, finals_text(messages)) <= JFK_LIVE_WER


async def test_no_engine_work_while_silent(daemon):
    rng = np.random.default_rng(0)
    async with connect(url(daemon, "/v1/stream")) as ws:
        await ws.send(start("quiet"))
        receiving = asyncio.create_task(receive_all(ws))
        await send_audio(ws, np.zeros(5 * 16000, np.float32), speed=None)  # digital silence
        await send_audio(ws, rng.normal(0, 1e-3, 5 * 16000).astype(np.float32), speed=None)  # a quiet room
        await ws.send(json.dumps({"type": "stop"}))
        messages = await receiving
    assert [m["type"] for m in messages] == ["ready", "end"]
    assert daemon.scheduler.stats.jobs == 0


async def test_shutdown_flushes_finals_and_closes_with_1001(engine, jfk_audio):
    d = Daemon(engine, ServerConfig(port=0))
    await d.start()
    async with connect(url(d, "/v1/captions?source=bye")) as viewer, connect(url(d, "/v1/stream")) as ws:
        await ws.send(start("bye"))
        await send_audio(ws, jfk_audio[: 5 * 16000], speed=None)  # mid-speech: "... my fellow Americans"
        receiving = asyncio.create_task(receive_all(ws))
        viewing = asyncio.create_task(receive_all(viewer))
        await asyncio.sleep(0.3)
        await d.shutdown()
        owned, viewed = await receiving, await viewing
    assert ws.close_code == 1001 and viewer.close_code == 1001
    assert owned[-1]["type"] == "end" and viewed[-1]["type"] == "end"
    assert "fellow americans" in normalise(finals_text(owned))
    assert [m for m in viewed if m["type"] == "final"] == [m for m in owned if m["type"] == "final"]


async def test_http_endpoints(daemon):
    base = f"http://127.0.0.1:{daemon.port}"

    def fetch(path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(base + path, timeout=10) as r:
                return r.status, r.headers["Content-Type"], r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read()

    health = await get_json(daemon, "/healthz")
    assert health["model"] == "tiny.en" and health["devices"]["encoder"] == "cpu"
    assert {"uptime_s", "streams", "lag_s", "viewers"} <= set(health)
    status, content_type, body = await asyncio.to_thread(fetch, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert b"streamd_streams 0.0" in body and b"streamd_final_latency_seconds_bucket" in body
    for name in (b'streamd_stage_seconds_total{device="cpu",stage="encoder"}', b"streamd_client_queue_max"):
        assert name in body, body.decode()
    status, _, body = await asyncio.to_thread(fetch, "/nope")
    assert status == 404 and b"no such path" in body
    status, content_type, body = await asyncio.to_thread(fetch, "/")
    assert status == 200 and content_type.startswith("text/html")
    assert b"/v1/captions" in body


async def test_two_workers_decode_two_streams_side_by_side(engine, jfk, jfk_audio):
    d = Daemon(engine, ServerConfig(port=0, workers=2))
    await d.start()
    try:

        async def client(name: str) -> list[dict]:
            async with connect(url(d, "/v1/stream")) as ws:
                await ws.send(start(name))
                receiving = asyncio.create_task(receive_all(ws))
                await send_audio(ws, jfk_audio, speed=4.0)
                await ws.send(json.dumps({"type": "stop"}))
                return await receiving

        results = await asyncio.gather(client("left"), client("right"))
    finally:
        await d.shutdown()
    assert d.scheduler.stats.most_concurrent == 2
    for messages in results:
        assert messages[-1]["type"] == "end"
        assert wer(jfk, finals_text(messages)) <= JFK_LIVE_WER, finals_text(messages)
