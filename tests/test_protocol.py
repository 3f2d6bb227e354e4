"""Protocol v1 without sockets: start frames, audio decoding, message numbering, outboxes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamd.hub import Hub, Message, Outbox
from streamd.policy import TimedWord
from streamd.protocol import AudioDecoder, AudioFormat, ProtocolError, event_message, parse_control, parse_start
from streamd.stream import Final, Partial, VadChange

START = {"type": "start", "protocol": 1, "source": "room-1", "audio": {"encoding": "pcm_f32le", "sample_rate": 48000}}


def test_parse_start_reads_the_design_example():
    start = parse_start(json.dumps(START))
    assert start.source == "room-1"
    assert start.audio == AudioFormat("pcm_f32le", 48000, 1)
    assert parse_start('{"type": "start"}').audio == AudioFormat()  # everything but the type defaults


@pytest.mark.parametrize(
    ("frame", "code", "close", "says"),
    [
        (b"\x00\x01", "bad_start", 1002, "not binary audio"),
        ("hello", "bad_start", 1002, "not JSON"),
        ('{"type": "stop"}', "bad_start", 1002, "'stop'"),
        ("[1, 2]", "bad_start", 1002, "JSON list"),
        ('{"type": "start", "protocol": 2}', "bad_start", 1002, "protocol 1"),
        ('{"type": "start", "source": "a b/c"}', "bad_start", 1002, "bad source"),
        ('{"type": "start", "audio": {"encoding": "opus"}}', "unsupported_encoding", 1003, "pcm_s16le"),
        ('{"type": "start", "audio": {"sample_rate": 1000}}', "unsupported_audio", 1003, "8000 to 192000"),
        ('{"type": "start", "audio": {"sample_rate": "16k"}}', "unsupported_audio", 1003, "integer"),
        ('{"type": "start", "audio": {"channels": 0}}', "unsupported_audio", 1003, "channels"),
        ('{"type": "start", "audio": "pcm"}', "bad_start", 1002, "must be an object"),
        ('{"type": "start", "language": "de"}', "unsupported_language", 1003, "'de'"),
    ],
)
def test_a_bad_start_is_a_fatal_error_that_says_why(frame, code, close, says):
    with pytest.raises(ProtocolError) as info:
        parse_start(frame)
    err = info.value
    assert (err.code, err.fatal, err.close_code) == (code, True, close)
    assert says in str(err)
    assert err.message() == {"type": "error", "code": code, "message": str(err), "fatal": True}


def test_control_messages():
    assert parse_control('{"type": "stop"}') == "stop"
    for frame, code in [
        ("not json", "bad_message"),
        ('{"type": "pause"}', "unknown_message"),
        ("3", "unknown_message"),
    ]:
        with pytest.raises(ProtocolError) as info:
            parse_control(frame)
        assert info.value.code == code and not info.value.fatal


def test_s16le_decodes_to_float():
    pcm = np.array([0, 16384, -32768, 32767], "<i2")
    samples, err = AudioDecoder(AudioFormat()).decode(pcm.tobytes())
    assert err is None and samples.dtype == np.float32
    np.testing.assert_allclose(samples, [0, 0.5, -1, 32767 / 32768])


def test_stereo_is_averaged_and_other_rates_resampled():
    t = np.arange(48000) / 48000
    tone = np.sin(2 * np.pi * 440 * t).astype("<f4")
    stereo = np.stack([tone, tone * 0.5], axis=1)
    decoder = AudioDecoder(AudioFormat("pcm_f32le", 48000, 2))
    out = []
    for i in range(0, 48000, 4800):  # 100 ms frames
        samples, err = decoder.decode(stereo[i : i + 4800].tobytes())
        assert err is None
        out.append(samples)
    out.append(decoder.flush())
    audio = np.concatenate(out)
    assert abs(len(audio) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio[:16000]))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins over one second
    assert 0.7 < np.max(np.abs(audio[2000:14000])) < 0.8  # the mean of 1 and 0.5


def test_odd_length_frames_keep_their_whole_samples_and_say_what_was_dropped():
    decoder = AudioDecoder(AudioFormat())
    samples, err = decoder.decode(np.arange(5, dtype="<i2").tobytes() + b"\x01")
    assert len(samples) == 5
    assert err is not None and err.code == "bad_audio" and not err.fatal and "1 bytes" in str(err)
    samples, err = decoder.decode(np.arange(3, dtype="<i2").tobytes())  # the next frame is aligned again
    assert err is None and len(samples) == 3


def test_a_byte_stream_carries_split_samples_over():
    pcm = (np.arange(1000, dtype="<i2") * 7).tobytes()
    decoder = AudioDecoder(AudioFormat(), carry=True)
    parts = [decoder.decode(pcm[i : i + 333])[0] for i in range(0, len(pcm), 333)]
    np.testing.assert_array_equal(np.concatenate(parts), np.frombuffer(pcm, "<i2") / 32768)


def test_oversize_frames_and_non_finite_samples():
    decoder = AudioDecoder(AudioFormat("pcm_f32le"), max_frame_bytes=400)
    with pytest.raises(ProtocolError) as info:
        decoder.decode(bytes(404))
    assert (info.value.code, info.value.fatal, info.value.close_code) == ("frame_too_large", True, 1009)
    samples, err = decoder.decode(np.array([0.1, np.nan, np.inf], "<f4").tobytes())
    assert err is not None and err.code == "bad_audio"
    np.testing.assert_allclose(samples, [0.1, 0.0, 1.0])


def test_event_messages():
    word = TimedWord(" Hi", 1.23456, 1.5, 0.91234)
    assert event_message(Final(3, 1.23456, 1.5, "Hi", [word])) == {
        "type": "final",
        "segment": 3,
        "start": 1.235,
        "end": 1.5,
        "text": "Hi",
        "words": [{"word": " Hi", "start": 1.235, "end": 1.5, "p": 0.912}],
    }
    assert event_message(Partial(4, 2.0, 2.5, "there"))["type"] == "partial"
    assert event_message(VadChange(False, 7.0)) == {"type": "vad", "speech": False, "t": 7.0}


def msg(kind: str, n: int = 0) -> Message:
    return Message(kind, json.dumps({"type": kind, "n": n}))


async def test_outbox_drops_stale_partials_never_finals():
    box = Outbox(limit=4)
    box.put(msg("partial", 1))
    box.put(msg("final", 2))
    box.put(msg("partial", 3))  # replaces partial 1
    box.put(msg("vad", 4))
    box.put(msg("final", 5))
    box.put(msg("final", 6))  # over the limit: partials and vad notices go, finals stay
    got = [json.loads((await box.get()).text)["n"] for _ in range(len(box))]
    assert got == [2, 5, 6]
    assert box.dropped == 3 and not box.overflowed


async def test_outbox_overflows_on_finals_and_tells_its_owner():
    calls = []
    box = Outbox(limit=3)
    box.on_overflow = lambda: calls.append(1)
    for i in range(4):
        box.put(msg("final", i))
    assert box.overflowed and calls == [1]
    assert await box.get() is None  # nothing more is delivered: the client is cut off


async def test_outbox_close_drains_first():
    box = Outbox()
    box.put(msg("final"))
    box.close()
    assert (await box.get()).type == "final"
    assert await box.get() is None


async def test_hub_numbers_messages_and_replays_finals_to_late_viewers():
    hub = Hub({"model": "tiny.en", "devices": {}})
    early = Outbox()
    hub.watch("room", early)  # before the source exists
    source = hub.open("room", "websocket")
    owner = source.owner = Outbox()
    source.emit([Partial(0, 0.0, 1.0, "hel"), Final(0, 0.0, 1.0, "hello", [])])
    source.error(ProtocolError("bad_audio", "odd"))  # to the owner only
    late = Outbox()
    hub.watch("room", late)
    with pytest.raises(ProtocolError, match="already streaming"):
        hub.open("room", "websocket")
    hub.close(source)

    def drain(box):
        out = []
        while len(box):
            out.append(json.loads(box._queue.popleft().text))
        return out

    assert [(m["type"], m["seq"]) for m in drain(early)] == [("ready", 0), ("partial", 1), ("final", 2), ("end", 4)]
    assert [(m["type"], m["seq"]) for m in drain(owner)] == [("partial", 1), ("final", 2), ("error", 3), ("end", 4)]
    assert [(m["type"], m["seq"]) for m in drain(late)] == [("ready", 0), ("final", 2), ("end", 4)]
    again = hub.open("room", "websocket")  # the id is free again: a new session
    assert again.session != source.session
    assert json.loads(early._queue[-1].text)["session"] == again.session


async def test_hub_limits_streams():
    hub = Hub({}, max_streams=1)
    hub.open(None, "tcp")
    with pytest.raises(ProtocolError) as info:
        hub.open(None, "tcp")
    assert info.value.code == "too_many_streams" and info.value.close_code == 1013


@pytest.mark.parametrize(("encoding", "subtype"), [("mulaw", "ULAW"), ("alaw", "ALAW")])
def test_g711_bytes_decode_as_libsndfile_decodes_them(tmp_path, encoding, subtype):
    """Telephony audio (Realtime's ``audio/pcmu``/``pcma``, Deepgram's ``mulaw``/``alaw``): every
    one of the 256 codes, encoded and decoded back by libsndfile, an implementation of its own."""
    import soundfile as sf

    ramp = np.linspace(-1, 1, 8000, dtype=np.float32)
    sf.write(tmp_path / "a.raw", ramp, 8000, format="RAW", subtype=subtype)
    raw = (tmp_path / "a.raw").read_bytes()
    assert len(set(raw)) > 200  # the ramp reaches (nearly) every code
    expected, _ = sf.read(tmp_path / "a.raw", format="RAW", subtype=subtype, samplerate=8000, channels=1,
                          dtype="float32")  # fmt: skip
    decoder = AudioDecoder(AudioFormat(encoding, 16000))  # (16 kHz: no resampling to compare through)
    samples, err = decoder.decode(raw)
    assert err is None
    np.testing.assert_allclose(samples, expected, atol=1e-6)
