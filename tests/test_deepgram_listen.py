"""Deepgram's live API (``ws /v1/listen``) on a real daemon, driven by the official ``deepgram-sdk``
on real speech; then the sans-I/O query parser and renderer."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamd.audio import load_audio
from streamd.deepgram_listen import ListenError, ListenRenderer, Received, parse_query
from streamd.server import Daemon

from .conftest import running, speech_file
from .live_clients import SPEED, live_bar, pcm16, v1_text, wer

deepgram = pytest.importorskip("deepgram")
from deepgram.core.api_error import ApiError  # noqa: E402
from deepgram.environment import DeepgramClientEnvironment  # noqa: E402

TOKEN = "deepgram-test-token"
LONG = "dev_librispeech_1221-135766-0001"
SHORT = "dev_librispeech_1221-135766-0002"  # carried as FLAC, and as MP3, M4A and WebM/Opus made from it


def client(d: Daemon, key: str = "unused") -> deepgram.AsyncDeepgramClient:
    base, ws = f"http://127.0.0.1:{d.port}", f"ws://127.0.0.1:{d.port}"
    env = DeepgramClientEnvironment(base=base, production=ws, agent=ws, agent_rest=base)
    return deepgram.AsyncDeepgramClient(api_key=key, environment=env)


async def stream(conn, pcm: bytes, finalize_at: int | None = None) -> list:
    """Send ``pcm`` (16 kHz s16le) in 100 ms frames at ``SPEED``, optionally ``Finalize`` after
    ``finalize_at`` bytes, then ``CloseStream``; every message the server sent, to ``Metadata``."""

    async def send() -> None:
        for i in range(0, len(pcm), 3200):
            await conn.send_media(pcm[i : i + 3200])
            if finalize_at is not None and i <= finalize_at < i + 3200:
                await conn.send_finalize()
            await asyncio.sleep(0.1 / SPEED)
        await conn.send_close_stream()

    sending = asyncio.create_task(send())
    messages = [m async for m in conn]
    await sending
    return messages


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def finals(messages) -> list:
    return [m for m in messages if m.type == "Results" and m.is_final]


async def test_the_sdk_streams_speech_and_gets_results_words_and_utterance_ends(engine):
    path = speech_file(LONG)
    pcm = pcm16(load_audio(path))
    async with running(engine) as d:
        options = {"model": "nova-3", "encoding": "linear16", "sample_rate": 16000, "interim_results": "true",
                   "utterance_end_ms": "1000", "vad_events": "true", "punctuate": "true"}  # fmt: skip
        async with client(d).listen.v1.connect(**options) as conn:
            sending = asyncio.create_task(stream(conn, pcm))
            while not d.hub.sources:
                await asyncio.sleep(0.01)
            metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{d.port}/metrics")
            assert 'streamd_streams_by_kind{kind="deepgram"} 1.0' in metrics
            messages = await sending
        v1 = await v1_text(d.port, pcm)
    types = [m.type for m in messages]
    assert "Error" not in types and types[-1] == "Metadata"
    assert messages[-1].duration == pytest.approx(len(pcm) / 32000, abs=0.01) and messages[-1].channels == 1
    assert "SpeechStarted" in types and "UtteranceEnd" in types
    assert any(m.type == "Results" and not m.is_final and m.channel.alternatives[0].transcript for m in messages)
    done = finals(messages)
    text = " ".join(t for m in done if (t := m.channel.alternatives[0].transcript))
    assert wer(path, text) <= live_bar(path, v1), (text, v1)
    assert sum(m.speech_final for m in done) == types.count("UtteranceEnd") >= 1
    for m in done:
        alt = m.channel.alternatives[0]
        if alt.transcript:
            assert " ".join(w.punctuated_word for w in alt.words) == alt.transcript
            assert all(w.word == w.word.lower() and m.start <= w.start <= w.end <= m.start + m.duration + 1e-6
                       and 0 < w.confidence <= 1 for w in alt.words)  # fmt: skip


async def test_finalize_ends_the_utterance_now_and_the_stream_goes_on(engine, jfk_audio):
    pcm = pcm16(jfk_audio)
    async with (
        running(engine) as d,
        client(d).listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000) as conn,
    ):
        messages = await stream(conn, pcm, finalize_at=len(pcm) // 2)
    done = finals(messages)
    assert any(m.from_finalize for m in done) and not all(m.from_finalize for m in done)
    text = " ".join(m.channel.alternatives[0].transcript for m in done)
    # A cut in mid-phrase costs the words either side of it ("what your" became "why? if your").
    assert "fellow americans" in text.lower() and "can do for your country" in text.lower()


async def test_webm_opus_as_a_browser_records_it_streams_with_no_encoding_and_reads_as_raw_audio(engine):
    webm = speech_file(SHORT).with_suffix(".webm")  # ffmpeg -c:a libopus (tests/data/README.md)
    data = webm.read_bytes()
    audio = load_audio(webm)
    async with running(engine) as d:
        async with client(d).listen.v1.connect(model="nova-3", interim_results="true") as conn:
            # As MediaRecorder(250 ms timeslices) sends it: pieces of the container, paced.
            step = len(data) * 25 // round(10 * len(audio) / 16000 * 10)

            async def send() -> None:
                for i in range(0, len(data), step):
                    await conn.send_media(data[i : i + step])
                    await asyncio.sleep(0.25 / SPEED)
                await conn.send_close_stream()

            sending = asyncio.create_task(send())
            messages = [m async for m in conn]
            await sending
        v1 = await v1_text(d.port, pcm16(audio))
        async with connect(f"ws://127.0.0.1:{d.port}/v1/listen") as ws:  # not audio at all
            await ws.send(b"\x1aE\xdf\xa3 this is not a WebM file " * 200)
            await ws.send(json.dumps({"type": "CloseStream"}))
            broken = []
            with contextlib.suppress(ConnectionClosed):
                async for m in ws:
                    broken.append(json.loads(m))
            closed = ws.close_code
    text = " ".join(m.channel.alternatives[0].transcript for m in finals(messages))
    assert messages[-1].type == "Metadata" and messages[-1].duration == pytest.approx(len(audio) / 16000, abs=0.05)
    assert wer(speech_file(SHORT), text) <= live_bar(speech_file(SHORT), v1), (text, v1)
    assert [m["type"] for m in broken][:1] == ["Error"] and "cannot decode" in broken[0]["description"]
    assert closed == 1008, closed  # as Deepgram closes on data it cannot decode


async def test_a_bad_query_is_refused_with_deepgrams_400_and_bad_messages_keep_the_stream(engine, jfk_audio):
    async with running(engine) as d:
        with pytest.raises(ApiError) as refused:
            async with client(d).listen.v1.connect(model="nova-3", encoding="speex", sample_rate=16000):
                pass
        assert refused.value.status_code == 400
        url = f"ws://127.0.0.1:{d.port}/v1/listen?encoding=linear16&language=fr"
        with pytest.raises(InvalidStatus) as bad:
            async with connect(url):
                pass
        assert bad.value.response.status_code == 400 and b"'fr'" in bad.value.response.body
        async with connect(f"ws://127.0.0.1:{d.port}/v1/listen?encoding=linear16&sample_rate=16000") as ws:
            await ws.send(json.dumps({"type": "Dance"}))
            error = json.loads(await ws.recv())
            assert error["type"] == "Error" and "Dance" in error["description"]
            await ws.send(pcm16(jfk_audio))
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = [json.loads(m) async for m in ws]
    assert "fellow" in " ".join(m["channel"]["alternatives"][0]["transcript"] for m in messages
                                if m["type"] == "Results").lower()  # fmt: skip


async def test_the_token_goes_in_a_token_header_or_the_token_subprotocol(engine):
    async with running(engine, token=TOKEN) as d:
        with pytest.raises(ApiError) as refused:
            async with client(d, key="wrong").listen.v1.connect(model="nova-3", encoding="linear16"):
                pass
        assert refused.value.status_code == 401
        async with client(d, key=TOKEN).listen.v1.connect(model="nova-3", encoding="linear16") as conn:
            await conn.send_close_stream()
            assert [m.type async for m in conn] == ["Metadata"]
        url = f"ws://127.0.0.1:{d.port}/v1/listen?encoding=linear16"
        async with connect(url, subprotocols=["token", TOKEN]) as ws:  # what a browser's WebSocket sends
            assert ws.subprotocol == "token"
            await ws.send(json.dumps({"type": "CloseStream"}))
            assert json.loads(await ws.recv())["type"] == "Metadata"


# --- sans I/O ---------------------------------------------------------------------------------


def test_the_query_takes_deepgrams_names_and_refuses_what_it_cannot_do():
    o = parse_query("encoding=mulaw&sample_rate=8000&interim_results=true&endpointing=false&utterance_end_ms=1500")
    assert (o.audio.encoding, o.audio.sample_rate, o.interim_results, o.endpointing, o.utterance_end_ms) == (
        "mulaw", 8000, True, False, 1500)  # fmt: skip
    # No encoding (or opus, ogg-opus, flac): a container, its format found in the data, as Deepgram does.
    assert parse_query("").audio is None and parse_query("encoding=opus&sample_rate=48000").audio is None
    bad_queries = [("encoding=speex", "'speex'"), ("encoding=linear16&channels=9",
                   "channels"), ("encoding=linear16&utterance_end_ms=500", "utterance_end_ms"),
                   ("encoding=linear16&multichannel=true", "multichannel"),
                   ("encoding=linear16&source=a b", "source")]  # fmt: skip
    for bad, says in bad_queries:
        with pytest.raises(ListenError, match=says):
            parse_query(bad)


def test_speech_final_marks_the_closing_final_or_comes_alone_when_the_words_were_out():
    o = parse_query("encoding=linear16")
    r = ListenRenderer(o, Received(o.audio))

    def out(msg):
        return [json.loads(m) for m in r.render(msg)]

    word = {"word": " Hi.", "start": 0.1, "end": 0.4, "p": 0.9}
    (first,) = out({"type": "final", "start": 0.1, "end": 0.4, "text": "Hi.", "words": [word]})
    assert first["is_final"] and not first["speech_final"]
    assert first["channel"]["alternatives"][0]["words"][0]["word"] == "hi"
    (alone,) = out({"type": "utterance_end", "t": 0.9})  # no closing final: an empty one says it
    assert alone["speech_final"] and alone["channel"]["alternatives"][0]["transcript"] == ""
    (closing,) = out({"type": "final", "start": 1.0, "end": 1.4, "text": "Bye.", "words": [word], "closes": True})
    assert closing["speech_final"] and out({"type": "utterance_end", "t": 1.6}) == []
