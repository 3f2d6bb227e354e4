"""Wyoming speech-to-text (Home Assistant's voice pipeline) on a real daemon, driven by the
``wyoming`` library's own client as Home Assistant drives it, on real speech; then the bounded
event reader, the renderer and the address rules, without sockets."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, read_event
from wyoming.info import Describe, Info
from wyoming.ping import Ping, Pong

from streamd import wyoming_asr
from streamd.audio import load_audio
from streamd.server import ServerConfig

from .conftest import DATA, running, speech_file
from .live_clients import SPEED, live_bar, pcm16, v1_text, wer

COMMAND = "dev_vctk_p287_001_clean"  # one short sentence, as a voice command is
LONG = "dev_librispeech_1221-135766-0001"


async def transcribe(client: AsyncTcpClient, pcm: bytes, rate: int = 16000, channels: int = 1,
                     language: str | None = "en", speed: float = SPEED) -> tuple[list[Event], int]:  # fmt: skip
    """What Home Assistant sends for one command (``pcm``: s16le at ``rate``, 100 ms chunks at
    ``speed``), and every event back to ``transcript-stop``; also how many came before
    ``audio-stop`` was sent."""
    events: list[Event] = []

    async def receive() -> None:
        while (event := await client.read_event()) is not None:
            events.append(event)
            if TranscriptStop.is_type(event.type) or Error.is_type(event.type):
                return

    receiving = asyncio.create_task(receive())
    await client.write_event(Transcribe(language=language).event())
    await client.write_event(AudioStart(rate=rate, width=2, channels=channels).event())
    step = rate // 10 * 2 * channels
    for i in range(0, len(pcm), step):
        await client.write_event(AudioChunk(rate=rate, width=2, channels=channels, audio=pcm[i : i + step]).event())
        await asyncio.sleep(0.1 / speed)
    before_stop = len(events)
    await client.write_event(AudioStop().event())
    await asyncio.wait_for(receiving, 60)
    return events, before_stop


def text_of(events: list[Event]) -> tuple[str, str]:
    """(the ``transcript``'s text, the ``transcript-chunk`` s joined)."""
    final = [Transcript.from_event(e).text for e in events if Transcript.is_type(e.type)]
    chunks = "".join(TranscriptChunk.from_event(e).text for e in events if TranscriptChunk.is_type(e.type))
    assert len(final) == 1, events
    return final[0], chunks


def offline_text(engine, audio) -> str:
    """``streamd transcribe``'s text (without word timestamps) for 16 kHz ``audio``."""
    from streamd.files import transcribe_file
    from streamd.vad import VadConfig
    from whisper_engine.transcribe import TranscribeOptions

    return transcribe_file(engine, audio, TranscribeOptions(word_timestamps=False), VadConfig()).text.strip()


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


async def test_home_assistant_s_exchange_streams_committed_words_then_the_transcript(engine):
    path = speech_file(LONG)
    pcm = pcm16(load_audio(path))
    async with running(engine, wyoming_port=0) as d:
        async with AsyncTcpClient("127.0.0.1", d.wyoming_port) as client:
            await client.write_event(Describe().event())
            info = Info.from_event(await client.read_event())
            sending = asyncio.create_task(transcribe(client, pcm))
            while not d.hub.sources:
                await asyncio.sleep(0.01)
            (source,) = json.loads(await asyncio.to_thread(_get, d.port, "/v1/sources"))["sources"]
            metrics = await asyncio.to_thread(_get, d.port, "/metrics")
            events, before_stop = await sending
        v1 = await v1_text(d.port, pcm)
    (program,) = info.asr
    assert program.name == "streamd" and program.supports_transcript_streaming and program.installed
    assert [m.name for m in program.models] == [engine.model_name] and program.models[0].languages == ["en"]
    # The captions page sees the command as it is spoken, as it sees any stream.
    assert source["id"].startswith("wyoming-") and 'streamd_streams_by_kind{kind="wyoming"} 1.0' in metrics
    types = [e.type for e in events]
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"], types
    # Committed words came while the audio still arrived, and the chunks add up to the transcript.
    assert before_stop >= 2 and TranscriptChunk.is_type(events[1].type), types
    final, chunks = text_of(events)
    # The chunks are the live words; the transcript, the whole command decoded once more after
    # the stop: streamd transcribe's text for the same audio.
    assert wer(path, chunks) <= live_bar(path, v1), (chunks, v1)
    assert final == offline_text(engine, load_audio(path)), final


async def test_a_command_at_44_1_khz_stereo_reads_as_at_16_khz_and_a_connection_serves_many(engine):
    path = speech_file(COMMAND)
    audio = load_audio(path)
    import soxr

    stereo = soxr.resample(audio, 16000, 44100)
    pcm44 = pcm16(stereo.repeat(2))  # both channels the same: interleaved L R L R
    async with running(engine, wyoming_port=0) as d, AsyncTcpClient("127.0.0.1", d.wyoming_port) as client:
        first, _ = await transcribe(client, pcm16(audio))
        second, _ = await transcribe(client, pcm44, rate=44100, channels=2)
        await client.write_event(Ping(text="still there").event())
        pong = await client.read_event()
    for events in (first, second):
        final, chunks = text_of(events)
        assert wer(path, final) <= 0.15 and wer(path, chunks) <= 0.15, (final, chunks)
    assert Pong.is_type(pong.type) and Pong.from_event(pong).text == "still there"


async def test_with_live_transcript_set_the_transcript_is_the_live_words_at_once(engine):
    path = speech_file(COMMAND)
    async with (
        running(engine, wyoming_port=0, wyoming_live_transcript=True) as d,
        AsyncTcpClient("127.0.0.1", d.wyoming_port) as client,
    ):
        events, _ = await transcribe(client, pcm16(load_audio(path)))
    final, chunks = text_of(events)
    assert final == chunks and wer(path, final) <= 0.15, final


async def test_music_and_a_stop_with_no_audio_give_an_empty_transcript_and_no_words(engine):
    music = load_audio(DATA / "music_acoustic_guitar.flac")
    async with running(engine, wyoming_port=0) as d, AsyncTcpClient("127.0.0.1", d.wyoming_port) as client:
        events, _ = await transcribe(client, pcm16(music), speed=8.0)
        await client.write_event(AudioStop().event())
        empty = await client.read_event()
    assert [e.type for e in events] == ["transcript-start", "transcript", "transcript-stop"]
    assert text_of(events) == ("", "")
    assert Transcript.is_type(empty.type) and Transcript.from_event(empty).text == ""


async def _raw(port: int, data: bytes) -> list[Event]:
    """Send ``data`` as it is; every event back until the daemon closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    events = []
    while (event := await asyncio.wait_for(wyoming_asr.read_event(reader, 1 << 20), 30)) is not None:
        events.append(event)
    writer.close()
    return events


@pytest.mark.parametrize(
    "data, code",
    [
        (b"not json\n", "bad_event"),
        (b'{"type": "audio-chunk", "payload_length": 99999999}\n', "frame_too_large"),
        (b'{"type": "describe", "data_length": -4}\n', "bad_event"),
        (b'{"type": "audio-start", "data": {"rate": 16000, "width": 4, "channels": 1}}\n', "unsupported_audio"),
        (b'{"type": "audio-start", "data": {"rate": 900, "width": 2, "channels": 1}}\n', "unsupported_audio"),
        (b'{"type": "transcribe", "data": {"language": "de"}}\n', "unsupported_language"),
        (b"{" * 70000, "bad_event"),  # a header past the line limit
    ],
)
async def test_a_broken_or_unsupported_event_gets_an_error_and_the_connection_closes(engine, data, code):
    async with running(engine, wyoming_port=0) as d:
        events = await _raw(d.wyoming_port, data)
        assert not d.hub.sources
    assert [e.type for e in events][-1] == "error" and Error.from_event(events[-1]).code == code, events


async def test_unknown_events_are_dropped_and_the_connection_goes_on(engine):
    async with running(engine, wyoming_port=0) as d, AsyncTcpClient("127.0.0.1", d.wyoming_port) as client:
        await client.write_event(Event(type="synthesize", data={"text": "hello"}))
        await client.write_event(Event(type="select-program", data={"name": "streamd"}))
        await client.write_event(Describe().event())
        reply = await client.read_event()
    assert Info.is_type(reply.type)


async def test_connections_past_the_limit_are_refused_with_an_error(engine):
    async with (
        running(engine, wyoming_port=0, max_connections=1) as d,
        AsyncTcpClient("127.0.0.1", d.wyoming_port) as first,
    ):
        await first.write_event(Describe().event())
        assert Info.is_type((await first.read_event()).type)
        events = await _raw(d.wyoming_port, b"")
    assert [Error.from_event(e).code for e in events] == ["too_many_connections"]


async def test_shutdown_mid_command_still_sends_the_transcript(engine):
    path = speech_file(LONG)
    pcm = pcm16(load_audio(path))
    d_events: list[Event] = []
    async with running(engine, wyoming_port=0) as d:
        client = AsyncTcpClient("127.0.0.1", d.wyoming_port)
        await client.connect()
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        for i in range(0, len(pcm) // 2, 3200):
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=pcm[i : i + 3200]).event())
            await asyncio.sleep(0.1 / SPEED)
        await d.shutdown()
        while (event := await client.read_event()) is not None:
            d_events.append(event)
        await client.disconnect()
    final, chunks = text_of(d_events)
    assert final == chunks and len(final.split()) >= 5, final  # stopping: no second decode, the live words
    assert d_events[-1].type == "transcript-stop"


async def test_the_port_is_announced_over_zeroconf_and_withdrawn_at_shutdown(engine):
    pytest.importorskip("zeroconf")
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    async def look_up(name: str) -> AsyncServiceInfo | None:
        """The service as a fresh mDNS client (Home Assistant) finds it, or ``None``."""
        zc = AsyncZeroconf()
        try:
            info = AsyncServiceInfo(wyoming_asr.SERVICE_TYPE, name)
            return info if await info.async_request(zc.zeroconf, 3000) else None
        finally:
            await zc.async_close()

    found: list[str] = []
    browser_zc = AsyncZeroconf()
    browser = AsyncServiceBrowser(browser_zc.zeroconf, wyoming_asr.SERVICE_TYPE,
                                  handlers=[lambda name, **_: found.append(name)])  # fmt: skip
    try:
        async with running(engine, wyoming_port=0, wyoming_zeroconf=True) as d:
            for _ in range(150):  # the browser's first query and its answer
                if found:
                    break
                await asyncio.sleep(0.1)
            assert found, "the browser did not find the Wyoming service"
            info = await look_up(found[0])
            port = d.wyoming_port
    finally:
        await browser.async_cancel()
        await browser_zc.async_close()
    assert info is not None and info.port == port and info.parsed_addresses() == ["127.0.0.1"]
    assert found[0].startswith("streamd-")
    assert await look_up(found[0]) is None  # withdrawn: Home Assistant does not offer a stale service


# --- sans-I/O: the reader, the renderer, the rules --------------------------------------------------


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=wyoming_asr.MAX_HEADER_BYTES)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_the_reader_takes_what_the_library_writes_and_nothing_past_its_limits():
    chunk = AudioChunk(rate=16000, width=2, channels=1, audio=b"\x01\x00" * 800).event()
    info = wyoming_asr.info_event("tiny.en")
    reader = _reader(wyoming_asr.encode(chunk) + wyoming_asr.encode(info))
    got = [await wyoming_asr.read_event(reader, 1600), await wyoming_asr.read_event(reader, 1600)]
    assert await wyoming_asr.read_event(reader, 1600) is None
    assert got[0].payload == chunk.payload and got[0].data == chunk.data
    assert Info.from_event(got[1]).asr[0].models[0].name == "tiny.en"
    with pytest.raises(wyoming_asr.ProtocolError, match="exceeds the limit of 1599"):
        await wyoming_asr.read_event(_reader(wyoming_asr.encode(chunk)), 1599)
    with pytest.raises(wyoming_asr.ProtocolError, match="ended inside"):
        await wyoming_asr.read_event(_reader(wyoming_asr.encode(chunk)[:-1]), 1600)


def test_the_renderer_streams_finals_as_chunks_and_ends_with_the_whole_transcript():
    r = wyoming_asr.TranscriptRenderer(wyoming_asr.info_event("tiny.en"))

    def events(msg: dict) -> list[Event]:
        return [read_event(io.BytesIO(frame)) for frame in r.render(msg)]

    assert events({"type": "ready"}) == [] and events({"type": "partial", "text": "ask not"}) == []
    first = events({"type": "final", "text": "Ask not what your country"})
    second = events({"type": "final", "text": " can do for you."})
    end = events({"type": "end"})
    assert [e.type for e in first] == ["transcript-start", "transcript-chunk"]
    assert [TranscriptChunk.from_event(e).text for e in (first[1], second[0])] == [
        "Ask not what your country", " can do for you."]  # fmt: skip
    assert [e.type for e in end] == ["transcript", "transcript-stop"]
    assert Transcript.from_event(end[0]).text == "Ask not what your country can do for you."
    assert Info.is_type(events({"control": "info"})[0].type)


def test_off_loopback_the_port_takes_only_the_allowed_networks():
    assert wyoming_asr.is_allowed("127.0.0.1", "") and wyoming_asr.is_allowed("::1", "")
    assert not wyoming_asr.is_allowed("192.168.1.5", "")
    assert wyoming_asr.is_allowed("192.168.1.5", "10.0.0.1, 192.168.1.0/24")
    assert wyoming_asr.is_allowed("::ffff:192.168.1.5", "192.168.1.5")
    assert not wyoming_asr.is_allowed("192.168.2.5", "192.168.1.0/24")
    with pytest.raises(ValueError, match="Wyoming has no authentication"):
        ServerConfig(wyoming_port=10300, wyoming_host="0.0.0.0")
    with pytest.raises(ValueError, match="wyoming_allow"):
        ServerConfig(wyoming_allow="192.168.1.300")
    assert ServerConfig(wyoming_port=10300, wyoming_host="0.0.0.0", wyoming_allow="192.168.1.0/24")


def test_the_settings_take_the_allowed_clients_as_a_list_and_refuse_an_open_port_without_them(tmp_path):
    import argparse

    from streamd.service import ConfigError
    from streamd.service import settings as read_settings

    path = tmp_path / "streamd.toml"
    path.write_text('wyoming_port = 10300\nwyoming_host = "0.0.0.0"\nwyoming_allow = ["192.168.1.20", "10.0.0.0/8"]\n')
    values = read_settings(argparse.Namespace(config=str(path)), environ={})
    assert values["wyoming_allow"] == "192.168.1.20,10.0.0.0/8"
    path.write_text('wyoming_port = 10300\nwyoming_host = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match="set wyoming_allow"):
        read_settings(argparse.Namespace(config=str(path)), environ={})


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda h, rest: json.dumps(h).encode() + b"\n" + rest,
              st.dictionaries(st.sampled_from(["type", "data", "data_length", "payload_length", "version"]),
                              st.one_of(st.integers(-5, 10**9), st.text(max_size=8), st.none(),
                                        st.dictionaries(st.text(max_size=4), st.integers()))),
              st.binary(max_size=64)),
))  # fmt: skip
def test_any_bytes_are_an_event_the_end_or_a_protocol_error_never_a_crash(data):
    async def read_all() -> None:
        reader = _reader(data)
        while await wyoming_asr.read_event(reader, 1024) is not None:
            pass

    with contextlib.suppress(wyoming_asr.ProtocolError):
        asyncio.run(read_all())
