"""Session resume (an optional extension of protocol v1): a stream client that drops comes back
with its session id and the last ``seq`` it saw, gets the finals it missed, and its audio goes on
in the same stream. A real daemon on a loopback port, the real engine, real speech."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamd.server import Daemon, ServerConfig

from .test_server import finals_text, get_json, pcm16, receive_all, send_audio, start, url, wer


@pytest.fixture
async def daemon(engine):
    d = Daemon(engine, ServerConfig(port=0, start_timeout_s=2.0, resume_s=20.0))
    await d.start()
    yield d
    await d.shutdown()


def resume(session: str, seq: int, source: str | None = None) -> str:
    msg = json.loads(start(source))
    msg["resume"] = {"session": session, "seq": seq}
    return json.dumps(msg)


async def _drain(ws, messages: list[dict], seconds: float) -> None:
    """Collect what arrives for ``seconds``."""
    with pytest.raises(TimeoutError):
        while True:
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), seconds)))


async def test_a_dropped_client_resumes_gets_the_finals_it_missed_and_its_audio_goes_on(daemon, jfk, jfk_audio):
    first_part, rest = jfk_audio[: 5 * 16000], jfk_audio[5 * 16000 :]
    seen: list[dict] = []
    async with connect(url(daemon, "/v1/captions?source=room")) as viewer:
        ws = await connect(url(daemon, "/v1/stream"))
        await ws.send(start("room"))
        ready = json.loads(await ws.recv())
        seen.append(ready)
        await send_audio(ws, first_part, speed=None)
        # The connection dies without a close frame; the client saw nothing past the ready message.
        ws.transport.write(b"\x82\x7e")
        ws.transport.abort()
        missed: list[dict] = []
        await _drain(viewer, missed, 8.0)  # meanwhile the session finalises the words already sent
        assert [m for m in missed if m["type"] == "final"], "the dropped client's last utterance became final"
        assert not [m for m in missed if m["type"] == "end"], "the session waits for its client"
        sources = (await get_json(daemon, "/v1/sources"))["sources"]
        assert sources == [{**sources[0], "id": "room", "session": ready["session"], "detached": True}]

        async with connect(url(daemon, "/v1/stream")) as again:
            await again.send(resume(ready["session"], ready["seq"], "room"))
            back = json.loads(await again.recv())
            assert back["type"] == "ready" and back["resumed"] is True and back["session"] == ready["session"]
            replayed = [json.loads(await again.recv()) for _ in [m for m in missed if m["type"] == "final"]]
            assert replayed == [m for m in missed if m["type"] == "final"]  # the same finals, same seq
            await send_audio(again, rest, speed=None)
            await again.send(json.dumps({"type": "stop"}))
            after = await receive_all(again)
        assert after[-1]["type"] == "end" and not [m for m in after if m["type"] == "error"]
        viewed = [json.loads(await asyncio.wait_for(viewer.recv(), 30)) for _ in range(2)]

    finals = [m for m in [*replayed, *after] if m["type"] == "final"]
    seqs = [m["seq"] for m in [*replayed, *after]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "one numbering across both connections"
    assert all(b["start"] >= a["end"] - 0.05 for a, b in itertools.pairwise(finals)), "times go on"
    assert wer(jfk, finals_text(finals)) <= 0.2, finals_text(finals)  # nothing said was lost
    assert all(m["seq"] > max(m["seq"] for m in missed) for m in viewed)  # the viewer stayed subscribed


async def test_an_unknown_or_expired_session_is_refused(engine, jfk_audio):
    d = Daemon(engine, ServerConfig(port=0, start_timeout_s=2.0, resume_s=1.0))
    await d.start()
    try:
        async with connect(url(d, "/v1/stream")) as ws:
            await ws.send(resume("0123456789ab", 3))
            err = json.loads(await ws.recv())
            assert err["type"] == "error" and err["code"] == "unknown_session"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008

        ws = await connect(url(d, "/v1/stream"))
        await ws.send(start("gone"))
        session = json.loads(await ws.recv())["session"]
        await ws.send(pcm16(jfk_audio[:16000]))
        ws.transport.abort()
        for _ in range(100):  # the session waits resume_s, then finalises and frees its id
            if "gone" not in d.hub.sources:
                break
            await asyncio.sleep(0.1)
        assert "gone" not in d.hub.sources
        async with connect(url(d, "/v1/stream")) as late:
            await late.send(resume(session, 1, "gone"))
            assert json.loads(await late.recv())["code"] == "unknown_session"
    finally:
        await d.shutdown()


async def test_a_resume_must_name_its_own_source_and_a_stopped_session_cannot_resume(daemon):
    ws = await connect(url(daemon, "/v1/stream"))
    await ws.send(start("mine"))
    session = json.loads(await ws.recv())["session"]
    ws.transport.abort()
    for _ in range(50):
        if daemon.detached:
            break
        await asyncio.sleep(0.1)
    async with connect(url(daemon, "/v1/stream")) as other:
        await other.send(resume(session, 0, "theirs"))
        err = json.loads(await other.recv())
        assert err["code"] == "bad_start" and "mine" in err["message"]
    async with connect(url(daemon, "/v1/stream")) as back:  # the refusal left the session waiting
        await back.send(resume(session, 0))
        assert json.loads(await back.recv())["resumed"] is True
        await back.send(json.dumps({"type": "stop"}))
        assert (await receive_all(back))[-1]["type"] == "end"
    async with connect(url(daemon, "/v1/stream")) as again:
        await again.send(resume(session, 0))
        assert json.loads(await again.recv())["code"] == "unknown_session"


async def test_shutdown_finalises_a_session_waiting_for_its_client(daemon, caplog):
    caplog.set_level(logging.INFO, logger="streamd")
    async with connect(url(daemon, "/v1/captions?source=left")) as viewer:
        ws = await connect(url(daemon, "/v1/stream"))
        await ws.send(start("left"))
        await ws.recv()
        await send_audio(ws, np.zeros(16000, np.float32), speed=None)
        ws.transport.abort()
        for _ in range(50):
            if daemon.detached:
                break
            await asyncio.sleep(0.1)
        assert daemon.detached
        await asyncio.wait_for(daemon.shutdown(), 10)  # not the 20 s the session would wait
        messages = await receive_all(viewer)
    assert messages[-1]["type"] == "end"
    assert "detached session finalised: the daemon is stopping" in caplog.text
    assert "not resumed within" not in caplog.text


async def test_detached_sessions_never_lock_out_new_streams(engine, jfk_audio, caplog):
    """Every slot taken by a client that dropped: a new stream still gets in, and the oldest
    detached session is finalised for it (its viewer gets its end); the log says why."""
    caplog.set_level(logging.INFO, logger="streamd")
    d = Daemon(engine, ServerConfig(port=0, start_timeout_s=2.0, resume_s=30.0, max_streams=3, max_detached=2))
    await d.start()
    try:
        async with connect(url(d, "/v1/captions?source=drop-0")) as viewer:
            for i in range(4):  # the fourth drop is past max_detached: drop-0 yields at once
                ws = await connect(url(d, "/v1/stream"))
                await ws.send(start(f"drop-{i}"))
                await ws.recv()
                await ws.send(pcm16(jfk_audio[:8000]))
                ws.transport.abort()
                for _ in range(50):
                    if f"drop-{i}" in {s.id for s in d.detached.sources()}:
                        break
                    await asyncio.sleep(0.05)
            assert [s.id for s in d.detached.sources()] == ["drop-2", "drop-3"]
            ended = [json.loads(m) for m in [await asyncio.wait_for(viewer.recv(), 10) for _ in range(2)]]
            assert ended[-1]["type"] == "end", ended
            # Two waiting, none live, three slots: three new streams get in; the second and the
            # third each take the slot of the oldest session still waiting.
            clients, waiting = [], []
            for i in range(3):
                ws = await connect(url(d, "/v1/stream"))
                await ws.send(start(f"new-{i}"))
                assert json.loads(await ws.recv())["type"] == "ready"
                clients.append(ws)
                waiting.append([s.id for s in d.detached.sources()])
            assert waiting == [["drop-2", "drop-3"], ["drop-3"], []]
            async with connect(url(d, "/v1/stream")) as refused:  # live streams at max_streams: 1013
                await refused.send(start("one-too-many"))
                assert json.loads(await refused.recv())["code"] == "too_many_streams"
            for ws in clients:
                await ws.send(json.dumps({"type": "stop"}))
                assert (await receive_all(ws))[-1]["type"] == "end"
    finally:
        await d.shutdown()
    assert "detached session finalised: its slot went to a new stream" in caplog.text
