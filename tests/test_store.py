"""Finals survive the daemon: the store on its own, then a real daemon killed mid-meeting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
import time
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamd.hub import Hub, Message, Outbox
from streamd.store import TranscriptStore

from .test_server import pcm16, start

JFK_WORDS = "ask not what your country can do for you"


def test_sessions_come_back_in_order_and_a_reopened_store_ends_the_live_ones(tmp_path):
    store = TranscriptStore(tmp_path / "t.db", retention_s=86400)
    store.add_session("room", "s1", 100.0 + time.time(), '{"type":"ready","session":"s1"}')
    for seq in (3, 1, 2):
        store.add_final("s1", seq, json.dumps({"type": "final", "seq": seq, "text": f"w{seq}"}))
    store.add_session("other", "s2", time.time(), "{}")
    store.close()  # no end_session: the daemon died

    again = TranscriptStore(tmp_path / "t.db", retention_s=86400)
    (stored,) = again.sessions("room")
    assert stored.session == "s1" and stored.ended and stored.last_seq == 3
    assert [json.loads(m)["text"] for m in stored.finals] == ["w1", "w2", "w3"]
    assert [s.session for s in again.sessions("other")] == ["s2"]
    assert again.sessions("nobody") == []


def test_sessions_past_the_retention_are_deleted_with_their_finals(tmp_path):
    store = TranscriptStore(tmp_path / "t.db", retention_s=3600)
    store.add_session("room", "old", time.time() - 7200, "{}")
    store.add_final("old", 1, "{}")
    store.add_session("room", "new", time.time(), "{}")
    assert store.purge() == 1
    assert [s.session for s in store.sessions("room")] == ["new"]


def test_a_viewer_gets_a_long_meeting_from_the_store_without_being_cut_off(tmp_path):
    """600 stored finals into an outbox of 256: history is a backlog, not a client falling behind."""
    store = TranscriptStore(tmp_path / "t.db", retention_s=86400)
    store.add_session("room", "s1", time.time(), '{"type":"ready","seq":0,"session":"s1"}')
    for seq in range(1, 601):
        store.add_final("s1", seq, json.dumps({"type": "final", "seq": seq, "segment": seq, "text": "w"}))
    hub = Hub({"model": "tiny.en"}, store=store)
    outbox = Outbox(limit=256)
    hub.watch("room", outbox)
    outbox.put(Message("partial", "{}"))  # a live message after the backlog still fits
    assert not outbox.overflowed and len(outbox) == 1 + 600 + 1 + 1
    kinds = []
    while len(outbox):
        kinds.append(asyncio.run(outbox.get()).type)
    assert kinds == ["ready", *["final"] * 600, "end", "partial"]


async def _serve(state_dir):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamd", "serve", "--port", "0", "--state-dir", str(state_dir),
        "--retention-days", "30", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 120)).decode()
        assert line, "the daemon exited before serving"
        if m := re.search(r"serving .* on http://127.0.0.1:(\d+)", line):
            return proc, int(m[1])


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, "", e.read().decode()


async def test_finals_sent_before_a_sigkill_are_there_after_the_restart(tmp_path, jfk_audio):
    proc, port = await _serve(tmp_path)
    try:
        ws = await connect(f"ws://127.0.0.1:{port}/v1/stream")
        await ws.send(start("room-9"))
        ready = json.loads(await ws.recv())
        seen: list[dict] = []
        for i in range(0, len(jfk_audio) // 2 + 16000 * 3, 1600):  # about 8 s of JFK, then the kill
            await ws.send(pcm16(jfk_audio[i : i + 1600]))
            await asyncio.sleep(0.02)
        while not seen:  # at least one final, then the kill wherever the daemon is
            msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if msg["type"] == "final":
                seen.append(msg)
        proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:  # whatever was sent before the kill
                if (msg := json.loads(frame))["type"] == "final":
                    seen.append(msg)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    proc, port = await _serve(tmp_path)
    try:
        async with connect(f"ws://127.0.0.1:{port}/v1/captions?source=room-9") as viewer:
            got = [json.loads(await asyncio.wait_for(viewer.recv(), 10)) for _ in range(len(seen) + 2)]
        assert got[0]["type"] == "ready" and got[0]["session"] == ready["session"]
        assert [m for m in got if m["type"] == "final"] == seen  # the same messages, same seq
        assert got[-1]["type"] == "end"
        status, kind, text = await asyncio.to_thread(_get, port, "/v1/sources/room-9/transcript?format=txt")
        assert status == 200 and kind.startswith("text/plain")
        assert text.strip() == " ".join(m["text"].strip() for m in seen)
        status, _, body = await asyncio.to_thread(_get, port, "/v1/sources/room-9/transcript?format=json")
        stored = json.loads(body)
        assert stored["source"] == "room-9" and [s["session"] for s in stored["sessions"]] == [ready["session"]]
        assert [f["seq"] for f in stored["sessions"][0]["finals"]] == [m["seq"] for m in seen]
        status, kind, srt = await asyncio.to_thread(_get, port, "/v1/sources/room-9/transcript?format=srt")
        assert status == 200 and srt.startswith("1\n00:00:0") and seen[0]["text"].strip() in srt
        status, kind, vtt = await asyncio.to_thread(_get, port, "/v1/sources/room-9/transcript?format=vtt")
        assert vtt.startswith("WEBVTT") and kind.startswith("text/vtt")
        assert (await asyncio.to_thread(_get, port, "/v1/sources/room-9/transcript?format=doc"))[0] == 400
        assert (await asyncio.to_thread(_get, port, "/v1/sources/nobody/transcript"))[0] == 404
    finally:
        proc.terminate()
        await proc.wait()
    assert any(word in " ".join(m["text"] for m in seen).lower() for word in JFK_WORDS.split())


@pytest.mark.parametrize("fmt", ["txt", "json"])
async def test_without_a_store_the_transcript_is_the_live_sessions(engine, jfk_audio, fmt):
    from streamd.server import Daemon, ServerConfig

    from .test_server import finals_text, receive_all, send_audio, url

    d = Daemon(engine, ServerConfig(port=0))
    await d.start()
    try:
        async with connect(url(d, "/v1/stream")) as ws:
            await ws.send(start("solo"))
            receiving = asyncio.create_task(receive_all(ws))
            await send_audio(ws, jfk_audio, speed=None)
            while d.hub.sources["solo"].finals < 1:
                await asyncio.sleep(0.05)
            status, _, body = await asyncio.to_thread(_get, d.port, f"/v1/sources/solo/transcript?format={fmt}")
            assert status == 200 and body.strip()
            await ws.send(json.dumps({"type": "stop"}))
            assert finals_text(await receiving)
    finally:
        await d.shutdown()
