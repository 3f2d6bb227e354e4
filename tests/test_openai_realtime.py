"""OpenAI's Realtime API (transcription mode) on a real daemon, driven by the official ``openai``
SDK's realtime client on real speech; then the sans-I/O renderer and client with scripted events."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json

import numpy as np
import pytest
import soundfile as sf
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamd.audio import load_audio
from streamd.openai_realtime import RealtimeClient, RealtimeRenderer, RealtimeSettings
from streamd.server import Daemon

from .conftest import running, speech_file
from .live_clients import SPEED, live_bar, pcm16, v1_text, wer

openai = pytest.importorskip("openai")

TOKEN = "realtime-test-token"
LONG = "dev_librispeech_1221-135766-0001"  # 16.7 s, several utterances


def client(d: Daemon, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key=key, max_retries=0)


def pcm24(audio: np.ndarray) -> bytes:
    return pcm16(soxr.resample(audio, 16000, 24000))


async def append_all(conn, pcm: bytes, rate: int = 24000, silence: bytes = b"\0\0", speed: float = SPEED) -> None:
    """``pcm`` in 100 ms appends at ``speed`` times real time, then 1.5 s of silence (the VAD's end).
    ``silence`` is one sample of it (μ-law's is 0xFF)."""
    step = rate * len(silence) // 10
    data = pcm + silence * (rate * 3 // 2)
    for i in range(0, len(data), step):
        await conn.input_audio_buffer.append(audio=base64.b64encode(data[i : i + step]).decode())
        await asyncio.sleep(0.1 / speed)


async def events_until(conn, done, timeout: float = 60.0) -> list:
    """Server events until ``done(event)`` is true (that event included)."""
    out = []
    while True:
        event = await asyncio.wait_for(conn.recv(), timeout)
        out.append(event)
        if done(event):
            return out


async def until_all_completed(conn, sending: asyncio.Task, timeout_s: float = 60.0) -> list:
    """Server events until the audio is sent and every utterance begun is completed (or a
    failure that lists them, after ``timeout_s``: an item never completed must not hang CI)."""
    events: list = []
    deadline = asyncio.get_running_loop().time() + timeout_s

    def started() -> int:
        return sum(e.type == "input_audio_buffer.speech_started" for e in events)

    while not (sending.done() and started() and len(completed(events)) == started()):
        assert asyncio.get_running_loop().time() < deadline, [e.type for e in events]
        with contextlib.suppress(TimeoutError):
            events.append(await asyncio.wait_for(conn.recv(), 0.5))
    await sending
    return events


def completed(events) -> list[str]:
    return [e.transcript for e in events if e.type == "conversation.item.input_audio_transcription.completed"]


async def test_the_sdk_streams_speech_and_gets_each_utterance_as_deltas_and_completed(engine):
    path = speech_file(LONG)
    audio = load_audio(path)
    async with running(engine) as d:
        api = client(d)
        async with api.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            created = await conn.recv()
            assert created.type == "session.created" and created.session.type == "transcription"
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                "turn_detection": {"type": "server_vad"}}}})  # fmt: skip
            sending = asyncio.create_task(append_all(conn, pcm := pcm24(audio)))
            events = await events_until(conn, lambda e: e.type == "session.updated")
            assert events[-1].session.audio.input.transcription.model == "gpt-4o-transcribe"
            events = await until_all_completed(conn, sending)
        v1 = await v1_text(d.port, pcm + bytes(2 * 36000), rate=24000)
    types = [e.type for e in events]
    assert "error" not in types
    assert types.count("input_audio_buffer.speech_started") == types.count("input_audio_buffer.speech_stopped") >= 1
    # Each item: its deltas, in order, are its completed transcript; nothing is ever revised.
    items: dict[str, str] = {}
    for e in events:
        if e.type == "conversation.item.input_audio_transcription.delta":
            items[e.item_id] = items.get(e.item_id, "") + e.delta
        if e.type == "conversation.item.input_audio_transcription.completed":
            assert items.get(e.item_id, "") == e.transcript
            assert e.usage.type == "duration" and e.usage.seconds > 0
    committed = [e.item_id for e in events if e.type == "input_audio_buffer.committed"]
    assert set(items) <= set(committed)
    text = " ".join(completed(events))
    assert wer(path, text) <= live_bar(path, v1), (text, v1)


async def test_a_beta_client_gets_the_beta_event_names_and_pcm16(engine, jfk, jfk_audio):
    async with running(engine) as d:
        api = client(d)
        connecting = api.realtime.connect(extra_query={"intent": "transcription"},
                                          extra_headers={"OpenAI-Beta": "realtime=v1"})  # fmt: skip
        async with connecting as conn:
            created = await conn.recv()
            assert created.type == "transcription_session.created"
            await conn.send({"type": "transcription_session.update", "session": {
                "input_audio_format": "pcm16", "input_audio_transcription": {"model": "whisper-1"}}})  # fmt: skip
            sending = asyncio.create_task(append_all(conn, pcm24(jfk_audio)))
            events = await events_until(conn, lambda e: "completed" in e.type and "fellow" in e.transcript.lower())
            await sending
    types = [e.type for e in events]
    assert "transcription_session.updated" in types and "conversation.item.created" in types
    assert "conversation.item.added" not in types and "session.updated" not in types


async def test_without_turn_detection_the_clients_commit_ends_one_item_with_everything_said(engine, jfk, jfk_audio):
    async with running(engine) as d, client(d).realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.recv()
        await conn.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
        await append_all(conn, pcm24(jfk_audio))
        await conn.input_audio_buffer.commit()
        events = await events_until(conn, lambda e: e.type.endswith("transcription.completed"))
    types = [e.type for e in events]
    assert "input_audio_buffer.speech_started" not in types and "input_audio_buffer.committed" in types
    (text,) = completed(events)
    assert wer(jfk, text) <= 0.15, text  # the whole recording, several utterances of the VAD, in one item
    assert types.index("input_audio_buffer.committed") < types.index(
        "conversation.item.input_audio_transcription.completed"
    )


async def test_telephony_audio_pcmu_transcribes(engine, jfk, jfk_audio):
    """G.711 μ-law at 8 kHz, as a phone bridge (Twilio) sends it."""
    buf = io.BytesIO()  # libsndfile encodes the μ-law: an encoder not ours
    sf.write(buf, soxr.resample(jfk_audio, 16000, 8000), 8000, format="RAW", subtype="ULAW")
    async with running(engine) as d, client(d).realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.recv()
        await conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcmu"}}}})  # fmt: skip
        sending = asyncio.create_task(append_all(conn, buf.getvalue(), rate=8000, silence=b"\xff"))
        events = await until_all_completed(conn, sending)
    text = " ".join(completed(events))
    assert wer(jfk, text) <= 0.3 and "what your country can do for you" in text.lower(), text  # (8 kHz costs words)


async def test_bad_events_get_openai_error_events_and_the_session_goes_on(engine, jfk_audio):
    async with running(engine) as d, client(d).realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.recv()
        await conn.send({"type": "input_audio_buffer.append", "audio": "not base64!", "event_id": "evt_1"})
        await conn.send({"type": "response.create"})
        await conn.send({"type": "input_audio_buffer.commit"})
        await conn.send({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "transcription": {"language": "de"}}}}})  # fmt: skip
        await conn.send({"type": "session.update", "session": {"type": "realtime"}})
        errors = []
        for _ in range(5):
            event = await asyncio.wait_for(conn.recv(), 10)
            assert event.type == "error"
            errors.append(event.error)
        assert [e.code for e in errors] == ["invalid_value", "invalid_value", "input_audio_buffer_commit_empty",
                                            "invalid_value", "invalid_value"]  # fmt: skip
        assert errors[0].event_id == "evt_1" and errors[0].param == "audio"
        assert errors[1].param == "type" and "language" in errors[3].param
        # Still open: speech sent now is transcribed.
        sending = asyncio.create_task(append_all(conn, pcm24(jfk_audio)))
        events = await events_until(conn, lambda e: e.type.endswith("transcription.completed"))
        await sending
    assert completed(events)[0]


async def test_the_token_is_the_api_key_or_the_subprotocol_browsers_offer(engine, jfk_audio):
    async with running(engine, token=TOKEN) as d:
        with pytest.raises(Exception) as refused:
            async with client(d, key="wrong").realtime.connect(extra_query={"intent": "transcription"}) as conn:
                await conn.recv()
        assert "401" in str(refused.value)
        async with client(d, key=TOKEN).realtime.connect(extra_query={"intent": "transcription"}) as conn:
            assert (await conn.recv()).type == "session.created"
        url = f"ws://127.0.0.1:{d.port}/v1/realtime?intent=transcription"
        offered = ["realtime", f"openai-insecure-api-key.{TOKEN}", "openai-beta.realtime-v1"]
        async with connect(url, subprotocols=offered) as ws:  # what a browser's WebSocket sends
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.recv())["type"] == "transcription_session.created"  # (it offered the beta)
        with pytest.raises(InvalidStatus) as bad:
            async with connect(url, subprotocols=["realtime", "openai-insecure-api-key.nope"]):
                pass
        assert bad.value.response.status_code == 401


async def test_a_captions_viewer_sees_a_realtime_source(engine, jfk_audio):
    async with running(engine) as d, connect(f"ws://127.0.0.1:{d.port}/v1/captions?source=desk-1") as viewer:
        async with client(d).realtime.connect(extra_query={"intent": "transcription", "source": "desk-1"}) as conn:
            await conn.recv()
            sending = asyncio.create_task(append_all(conn, pcm24(jfk_audio)))
            events = await events_until(conn, lambda e: "completed" in e.type and "fellow" in e.transcript.lower())
            await sending
        seen = []
        while not any(m["type"] == "end" for m in seen):
            seen.append(json.loads(await asyncio.wait_for(viewer.recv(), 20)))
    assert seen[0]["type"] == "ready" and seen[0]["source"] == "desk-1"
    assert "fellow" in " ".join(m["text"] for m in seen if m["type"] == "final").lower()
    assert completed(events)


# --- sans I/O ---------------------------------------------------------------------------------


def test_the_renderer_gives_each_utterance_its_own_item_even_when_finals_arrive_late():
    client_ = RealtimeClient(RealtimeSettings(model="tiny.en"), beta=False)
    r = RealtimeRenderer(client_.created(), beta=False)

    def events(*msgs):
        return [json.loads(e) for m in msgs for e in r.render(m)]

    out = events({"type": "ready"}, {"type": "vad", "speech": True, "t": 0.5}, {"type": "final", "text": "Hello"},
                 {"type": "vad", "speech": False, "t": 1.5}, {"type": "vad", "speech": True, "t": 2.0},
                 {"type": "final", "text": "there.", "closes": True}, {"type": "utterance_end", "t": 1.5},
                 {"type": "final", "text": "Next one."}, {"type": "utterance_end", "t": 3.0})  # fmt: skip
    assert out[0]["type"] == "session.created"
    started = [e["item_id"] for e in out if e["type"] == "input_audio_buffer.speech_started"]
    done = {e["item_id"]: e["transcript"] for e in out if e["type"].endswith("completed")}
    assert done == {started[0]: "Hello there.", started[1]: "Next one."}
    assert len({e["event_id"] for e in out}) == len(out)


def test_the_client_refuses_a_commit_of_less_than_100_ms_and_counts_appends_in_its_format():
    c = RealtimeClient(RealtimeSettings(model="tiny.en"), beta=False)
    (reply,) = c.handle(json.dumps({"type": "input_audio_buffer.commit"}))
    assert reply.event["error"]["code"] == "input_audio_buffer_commit_empty"
    c.handle(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(4800)).decode()}))
    assert c.appended_ms == pytest.approx(100.0)  # 4,800 bytes of 24 kHz pcm16
    (commit,) = c.handle(json.dumps({"type": "input_audio_buffer.commit"}))
    assert type(commit).__name__ == "Commit" and c.appended_ms == 0
