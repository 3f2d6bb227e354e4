"""Protocol fuzzing: whatever a client sends, the daemon answers with a defined error, never crashes,
and another stream loses nothing.

Two layers:

- the sans-I/O protocol (:func:`parse_start`, :func:`parse_control`, :class:`AudioDecoder`) on arbitrary
  JSON, text and bytes: a valid result or a :class:`ProtocolError` with a known code, nothing else;
- one real daemon (the real engine, a loopback port) fed hypothesis-generated connections: a start
  message that may be junk, then binary and text frames in any order, sizes and contents, then a stop,
  a close or a torn-down socket. Each answer is checked against what the protocol says it must be,
  the daemon must log no error and come back idle after each case, and all the while a well-behaved
  client streams a real recording (with a viewer) whose transcript must come through whole.

Example counts: the default profile runs 1250 examples, 900 of them on the protocol alone (a few
milliseconds each) and 350 connections to the daemon, in 15-40 s on two cores (more when the machine
is busy); ``STREAMD_FUZZ_PROFILE=long`` runs ten times as many::

    STREAMD_FUZZ_PROFILE=long .venv/bin/pytest tests/test_fuzz.py -q -p no:cacheprovider

The daemon is ``streamd serve`` in a process of its own (a crash cannot hide, and nothing here leans
on its internals); the clients run on an event loop thread, each hypothesis example driven
synchronously from the test through ``asyncio.run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import jiwer
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from whisper_normalizer.english import EnglishTextNormalizer

from streamd.audio import load_audio
from streamd.protocol import AudioDecoder, AudioFormat, ProtocolError, Resume, Start, parse_control, parse_start

from .conftest import reference, speech_file

# --- profiles -------------------------------------------------------------------------------------

settings.register_profile(
    "streamd-fuzz",
    max_examples=100,  # a unit: each test asks for a multiple of it (see ``fuzz``)
    deadline=None,  # the daemon's answer time varies with the engine's load
    database=None,  # no .hypothesis/ folder in the checkout; a failure prints its example and a blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("streamd-fuzz-long", settings.get_profile("streamd-fuzz"), max_examples=1000)
PROFILE = os.environ.get("STREAMD_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"STREAMD_FUZZ_PROFILE must be ci or long, not {PROFILE!r}")
FUZZ = settings.get_profile("streamd-fuzz-long" if PROFILE == "long" else "streamd-fuzz")


def fuzz(units: float) -> settings:
    """``units`` hundred examples in the default profile (ten times as many in the long one)."""
    return settings(FUZZ, max_examples=max(1, round(units * FUZZ.max_examples)))


# --- what the protocol allows ---------------------------------------------------------------------

# Every error code the daemon may send (README's table). A new code is added here on purpose: a
# client must be able to rely on a fixed, documented set.
START_CODES = {"bad_start", "unsupported_encoding", "unsupported_audio", "unsupported_language"}
CONTROL_CODES = {"bad_message", "unknown_message"}
AUDIO_CODES = {"bad_audio", "frame_too_large"}
SERVER_CODES = {"source_in_use", "too_many_streams", "unknown_session", "slow_client", "bad_request", "read_only"}
FAILURE_CODES = {"engine_error", "internal_error"}  # defined, but a client's input must never cause them
KNOWN_CODES = START_CODES | CONTROL_CODES | AUDIO_CODES | SERVER_CODES | FAILURE_CODES
MESSAGE_TYPES = {"ready", "partial", "final", "vad", "utterance_end", "error", "end"}
# Close codes the daemon (or websockets on its behalf) ends a connection with. 1011 (internal
# error) is not among them: websockets sends it when a connection handler raised.
NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA, INVALID_DATA = 1000, 1001, 1002, 1003, 1007
POLICY_VIOLATION, MESSAGE_TOO_BIG, TRY_AGAIN_LATER = 1008, 1009, 1013
CLOSE_CODES = {NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA, INVALID_DATA, POLICY_VIOLATION,
               MESSAGE_TOO_BIG, TRY_AGAIN_LATER}  # fmt: skip
START_CLOSE = {"bad_start": PROTOCOL_ERROR, "unsupported_encoding": UNSUPPORTED_DATA,
               "unsupported_audio": UNSUPPORTED_DATA, "unsupported_language": UNSUPPORTED_DATA}  # fmt: skip

# Written out here rather than imported: the test checks the protocol's own patterns.
SOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
SESSION_RE = re.compile(r"[0-9a-f]{12}")
ENCODINGS = ("pcm_s16le", "pcm_f32le")
COMMON_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000, 192000)


def valid_source(v: object) -> bool:
    return isinstance(v, str) and SOURCE_RE.fullmatch(v) is not None


def valid_rate(v: object) -> bool:
    return type(v) is int and 8000 <= v <= 192000


def valid_channels(v: object) -> bool:
    return type(v) is int and 1 <= v <= 8


def valid_session(v: object) -> bool:
    return isinstance(v, str) and SESSION_RE.fullmatch(v) is not None


def valid_seq(v: object) -> bool:
    return type(v) is int and 0 <= v < 2**53


# --- strategies: JSON, text, bytes ----------------------------------------------------------------

START_FIELDS = {"type", "protocol", "source", "audio", "language", "resume"}
FIELD_NAMES = ["type", "protocol", "source", "audio", "language", "resume", "encoding", "sample_rate", "channels",
               "session", "seq", "start", "stop"]  # fmt: skip
# Any code point that UTF-8 can carry (no lone surrogates: a text frame must be valid UTF-8), with
# the odd ones made likely: controls, NUL, line separators, bidi overrides, BOM, combining marks.
odd_chars = st.one_of(
    st.characters(codec="utf-8"),
    st.sampled_from("\x00\t\n\r\x1b\x7f\x85\u00a0\u2028\u2029\u202e\u200b\ufeff\u0301\uffff\U0010ffff中é١😀"),
)
odd_text = st.text(odd_chars, max_size=40)
huge_ints = st.one_of(
    st.integers(),
    st.integers(-(2**80), 2**80),
    st.sampled_from([2**31, 2**53 - 1, 2**53, 2**53 + 1, 2**63, 2**64, -(2**63), 10**100, -(10**100), 10**1000]),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), huge_ints, st.floats(), odd_text, st.sampled_from(FIELD_NAMES + list(ENCODINGS))
)  # st.floats(): nan and ±inf too, which Python's json writes as NaN and Infinity
json_keys = st.one_of(st.sampled_from(FIELD_NAMES), odd_text)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(json_keys, children, max_size=4)),
    max_leaves=12,
)


@st.composite
def dumped(draw, values=json_values) -> str:
    return json.dumps(draw(values), ensure_ascii=draw(st.booleans()))


@st.composite
def nested(draw, max_depth: int = 2000) -> str:
    """JSON nested deeper than Python's recursion limit lets ``json.loads`` go, and shallower."""
    depth = draw(st.one_of(st.integers(1, 50), st.integers(900, 1100), st.integers(1, max_depth)))
    kind = draw(st.sampled_from(["list", "object", "start"]))
    if kind == "list":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"type":' * depth + '"stop"' + "}" * depth
    return '{"type": "start", "audio": ' + '{"encoding":' * depth + "1" + "}" * depth + "}"


# Numbers past Python's 4300-digit limit for int(str) (json.loads raises ValueError on them).
long_number = st.integers(4290, 4400).map(lambda n: '{"type": "start", "audio": {"sample_rate": ' + "9" * n + "}}")
any_text = st.one_of(odd_text, st.text(max_size=200), dumped(), nested(), long_number)


@st.composite
def valid_start(draw, with_resume: bool | None = None) -> dict:
    """A start message the protocol accepts, each optional field present or not."""
    msg: dict = {"type": "start"}
    if draw(st.booleans()):
        msg["protocol"] = 1
    if draw(st.booleans()):
        msg["source"] = draw(st.from_regex(SOURCE_RE, fullmatch=True).filter(lambda s: s != GOOD_SOURCE))
    if draw(st.booleans()):
        msg["language"] = "en"
    audio: dict = {}
    if draw(st.booleans()):
        audio["encoding"] = draw(st.sampled_from(ENCODINGS))
    if draw(st.booleans()):
        audio["sample_rate"] = draw(st.one_of(st.sampled_from(COMMON_RATES), st.integers(8000, 192000)))
    if draw(st.booleans()):
        audio["channels"] = draw(st.integers(1, 8))
    if audio or draw(st.booleans()):
        msg["audio"] = audio
    if with_resume if with_resume is not None else draw(st.integers(0, 3)) == 0:
        resume = {"session": draw(st.from_regex(SESSION_RE, fullmatch=True))}
        if draw(st.booleans()):
            resume["seq"] = draw(st.one_of(st.integers(0, 1000), st.integers(0, 2**53 - 1)))
        msg["resume"] = resume
    elif draw(st.booleans()):
        msg["resume"] = None  # null: no resume
    unknown = odd_text.filter(lambda k: k not in START_FIELDS)
    msg.update(draw(st.dictionaries(unknown, json_values, max_size=2)))  # unknown fields are ignored
    return msg


def expected_start(msg: dict) -> Start:
    audio = msg.get("audio") or {}
    resume = msg.get("resume")
    return Start(
        msg.get("source"),
        AudioFormat(audio.get("encoding", "pcm_s16le"), audio.get("sample_rate", 16000), audio.get("channels", 1)),
        msg.get("language", "en"),
        Resume(resume["session"], resume.get("seq", 0)) if resume is not None else None,
    )


# One field of a valid start made wrong: (path, which values are wrong there, the code, near misses).
MUTATIONS = {
    ("type",): (lambda v: v != "start", "bad_start", ["Start", "stop", " start", None]),
    # 1, 1.0 and true all equal 1 to Python: the parser takes them as protocol 1.
    ("protocol",): (lambda v: v != 1, "bad_start", [0, 2, "1", -1, 2**64, None, 1.5]),
    ("source",): (
        lambda v: v is not None and not valid_source(v),
        "bad_start",
        ["", "a b", "a/b", "-a", ".a", "a\n", "a" * 65, "é", "١", "a\x00", ["a"], 7],
    ),
    ("language",): (lambda v: v != "en", "unsupported_language", ["EN", "de", "en ", "", None, ["en"], {"en": 1}]),
    ("audio",): (lambda v: not isinstance(v, dict), "bad_start", ["pcm", None, [], 16000, True]),
    ("audio", "encoding"): (
        lambda v: v not in ENCODINGS,
        "unsupported_encoding",
        ["PCM_S16LE", "pcm_s16be", "opus", "", None, ["pcm_s16le"], {"pcm_s16le": 1}, 1],
    ),
    ("audio", "sample_rate"): (
        lambda v: not valid_rate(v),
        "unsupported_audio",
        [7999, 192001, 0, -16000, 16000.0, "16000", True, None, 2**64, math.inf, math.nan, [16000]],
    ),
    ("audio", "channels"): (
        lambda v: not valid_channels(v),
        "unsupported_audio",
        [0, 9, -1, 1.0, "1", True, False, None, 2**64, [1]],
    ),
    ("resume",): (lambda v: v is not None and not isinstance(v, dict), "bad_start", ["abc", [], 5, True]),
    ("resume", "session"): (
        lambda v: not valid_session(v),
        "bad_start",
        ["", "0123456789a", "0123456789abc", "0123456789AB", "0123456789ab\n", None, 123456789012, ["x"]],
    ),
    ("resume", "seq"): (
        lambda v: not valid_seq(v),
        "bad_start",
        [-1, 2**53, 2**64, 1.0, 1.5, "1", True, False, None, math.nan, [1]],
    ),
}


@st.composite
def start_with_a_bad_field(draw) -> tuple[dict, tuple[str, ...], str]:
    """A valid start with one field made wrong, and the error code that must answer it."""
    path = draw(st.sampled_from(sorted(MUTATIONS)))
    wrong, code, near = MUTATIONS[path]
    msg = draw(valid_start(with_resume=path[0] == "resume"))
    value = draw(st.one_of(st.sampled_from(near), json_values).filter(wrong))
    target = msg
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    return msg, path, code


# --- 1. the protocol without sockets --------------------------------------------------------------


def check_error(err: ProtocolError, codes: set[str]) -> None:
    assert err.code in codes, err.code
    assert isinstance(err.fatal, bool) and err.close_code in CLOSE_CODES
    message = err.message()
    assert message == {"type": "error", "code": err.code, "message": str(err), "fatal": err.fatal}
    assert str(err) and json.loads(json.dumps(message)) == message


def check_start(start: Start) -> None:
    """What a parsed start promises the server."""
    assert start.source is None or valid_source(start.source), start.source
    assert start.language == "en"
    fmt = start.audio
    assert fmt.encoding in ENCODINGS and valid_rate(fmt.sample_rate) and valid_channels(fmt.channels), fmt
    assert fmt.frame_bytes in {2 * fmt.channels, 4 * fmt.channels}
    if start.resume is not None:
        assert valid_session(start.resume.session) and valid_seq(start.resume.seq), start.resume


def parse_start_or_error(frame: str | bytes) -> Start | ProtocolError:
    try:
        start = parse_start(frame)
    except ProtocolError as err:
        check_error(err, START_CODES)
        assert err.fatal and err.close_code == START_CLOSE[err.code], (err.code, err.close_code)
        return err
    check_start(start)
    return start


@fuzz(2)
@given(frame=st.one_of(dumped(), dumped(st.dictionaries(json_keys, json_values)), any_text, st.binary(max_size=64)))
@example(frame='{"type": "start", "audio": {"encoding": []}}')  # unhashable: was a TypeError
@example(frame='{"type": "start", "audio": {"encoding": {}}}')
@example(frame="[" * 5000)  # was a RecursionError
@example(frame='{"type": "start", "source": "room-1\\n"}')  # "$" matched before the newline
def test_parse_start_takes_anything_and_returns_a_start_or_a_defined_error(frame):
    parse_start_or_error(frame)


@fuzz(2)
@given(case=start_with_a_bad_field())
def test_a_start_with_one_bad_field_gets_that_fields_error(case):
    msg, path, code = case
    result = parse_start_or_error(json.dumps(msg))
    assert isinstance(result, ProtocolError), f"{'.'.join(path)}={msg_at(msg, path)!r} was accepted"
    assert result.code == code, (path, str(result))


def msg_at(msg: dict, path: tuple[str, ...]) -> object:
    for key in path:
        msg = msg[key]
    return msg


@fuzz(1)
@given(msg=valid_start(), ascii_only=st.booleans())
def test_a_valid_start_reads_back_exactly(msg, ascii_only):
    assert parse_start_or_error(json.dumps(msg, ensure_ascii=ascii_only)) == expected_start(msg)


def control_oracle(frame: str) -> str:
    """What :func:`parse_control` must make of ``frame``: "stop" or an error code."""
    try:
        msg = json.loads(frame)
    except (ValueError, RecursionError):
        return "bad_message"
    return "stop" if isinstance(msg, dict) and msg.get("type") == "stop" else "unknown_message"


control_frames = st.one_of(
    any_text,
    dumped(st.fixed_dictionaries({"type": st.one_of(st.just("stop"), json_values)}, optional={"x": json_values})),
    st.sampled_from(['{"type":"stop"}', '{"type": "Stop"}', '"stop"', "stop", '{"type":"stop"', "{}", "null", "NaN"]),
)


@fuzz(2)
@given(frame=control_frames)
@example(frame="[" * 5000)  # was a RecursionError, which ended the stream with internal_error
def test_parse_control_returns_stop_or_a_non_fatal_error(frame):
    want = control_oracle(frame)
    try:
        got = parse_control(frame)
    except ProtocolError as err:
        check_error(err, CONTROL_CODES)
        assert not err.fatal
        got = err.code
    assert got == want


F32_SPECIALS = [math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e20, -1e20, 1.0, -1.0, 0.0, -0.0, 1e-45, 0.5, 2.0]
S16_SPECIALS = [32767, -32768, 0, 1, -1, 16384]


class Frame:
    """One websocket frame a client sends (binary audio or text), with a short repr for reports."""

    def __init__(self, data: bytes | str, what: str) -> None:
        self.data, self.what = data, what

    def __repr__(self) -> str:
        head = self.data[:32]
        more = "…" if len(self.data) > 32 else ""
        unit = "bytes" if isinstance(self.data, bytes) else "chars"
        return f"Frame({self.what}, {len(self.data)} {unit}, {head!r}{more})"

    @property
    def size(self) -> int:
        """Bytes on the wire."""
        return len(self.data) if isinstance(self.data, bytes) else len(self.data.encode())


@st.composite
def audio_frame(draw, big: tuple[int, ...] = ()) -> Frame:
    """Binary frames: silence, noise, constant bytes (0xff… is NaN as float), special floats and
    extreme integers, any length (not a whole number of samples too). Big frames are silence or a
    constant byte only, so that they rarely make the engine work."""
    kind = draw(st.sampled_from(["zeros", "noise", "byte", "f32", "s16", "raw"]))
    if kind in ("zeros", "byte"):
        size = draw(st.one_of(st.integers(0, 3200), st.sampled_from(big) if big else st.integers(0, 3200)))
        byte = 0 if kind == "zeros" else draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        return Frame(bytes([byte]) * size, f"{kind} {byte:#04x}")
    if kind == "noise":
        size, seed = draw(st.integers(0, 1600)), draw(st.integers(0, 2**32 - 1))
        return Frame(np.random.default_rng(seed).bytes(size), f"noise seed={seed}")
    tail = draw(st.binary(max_size=3))  # a part of a sample at the end
    if kind == "f32":
        values = draw(st.lists(st.one_of(st.sampled_from(F32_SPECIALS), st.floats(width=32)), max_size=400))
        return Frame(np.array(values, "<f4").tobytes() + tail, "f32")
    if kind == "s16":
        values = draw(st.lists(st.one_of(st.sampled_from(S16_SPECIALS), st.integers(-32768, 32767)), max_size=400))
        return Frame(np.array(values, "<i2").tobytes() + tail, "s16")
    return Frame(draw(st.binary(max_size=64)), "raw")


@functools.cache
def speech_pcm16() -> bytes:
    return pcm16(load_audio(speech_file("dev_jfk_inaugural_1961")))


@st.composite
def speech_frame(draw) -> Frame:
    """0.1-0.5 s of a real recording (s16 16 kHz mono, whatever the stream's format): the engine works."""
    pcm = speech_pcm16()
    start, n = draw(st.integers(0, len(pcm) // 3200 - 1)) * 3200, draw(st.sampled_from([3200, 9600, 16000]))
    return Frame(pcm[start : start + n], f"speech at {start / 32000:.1f} s")


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


audio_formats = st.builds(
    AudioFormat,
    st.sampled_from(ENCODINGS),
    st.one_of(st.sampled_from(COMMON_RATES), st.integers(8000, 192000)),
    st.integers(1, 8),
)


def whole_samples(fmt: AudioFormat, data: bytes) -> np.ndarray:
    """The reference decoding: whole samples of every channel, scaled, non-finite replaced, clipped,
    channels averaged."""
    width = 2 if fmt.encoding == "pcm_s16le" else 4
    usable = len(data) - len(data) % (width * fmt.channels)
    if fmt.encoding == "pcm_s16le":
        x = np.frombuffer(data[:usable], "<i2").astype(np.float64) / 32768
    else:
        with np.errstate(invalid="ignore"):  # signalling NaNs
            x = np.frombuffer(data[:usable], "<f4").astype(np.float64)
        x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1, 1)
    return x.reshape(-1, fmt.channels).mean(axis=1)


@fuzz(2)
@given(
    fmt=audio_formats,
    frames=st.lists(audio_frame(big=(401, 800, 801)), max_size=8),
    limit=st.one_of(st.none(), st.integers(0, 1000)),
    carry=st.booleans(),
)
@example(fmt=AudioFormat("pcm_f32le"), frames=[Frame(np.full(1600, 3e38, "<f4").tobytes(), "f32")], limit=None,
         carry=False)  # fmt: skip
@example(fmt=AudioFormat("pcm_f32le", 16000, 2), frames=[Frame(np.full(4, 3e38, "<f4").tobytes(), "f32")],
         limit=None, carry=False)  # fmt: skip
def test_audio_decoder_returns_clean_samples_or_a_defined_error(fmt, frames, limit, carry):
    decoder = AudioDecoder(fmt, limit, carry=carry)
    resampled = fmt.sample_rate != 16000
    width = 2 if fmt.encoding == "pcm_s16le" else 4
    pending, total_in, outputs = b"", 0, []
    for frame in frames:
        data = frame.data
        try:
            samples, err = decoder.decode(data)
        except ProtocolError as fatal:
            check_error(fatal, AUDIO_CODES)
            assert (fatal.code, fatal.fatal, fatal.close_code) == ("frame_too_large", True, MESSAGE_TOO_BIG)
            assert limit is not None and len(data) > limit
            break  # the server ends the stream here
        assert limit is None or len(data) <= limit
        joined = pending + data
        usable = len(joined) - len(joined) % (width * fmt.channels)
        pending = joined[usable:] if carry else b""
        raw = np.frombuffer(joined[:usable], "<f4") if fmt.encoding == "pcm_f32le" else np.zeros(0)
        misaligned = not carry and usable < len(joined)
        expect_error = misaligned or not np.all(np.isfinite(raw))
        assert (err is not None) == expect_error, (err, misaligned)
        if err is not None:
            check_error(err, AUDIO_CODES)
            assert err.code == "bad_audio" and not err.fatal
        assert samples.dtype == np.float32 and samples.ndim == 1
        assert np.all(np.isfinite(samples))
        want = whole_samples(fmt, joined)
        total_in += len(want)
        if resampled:
            assert np.all(np.abs(samples) <= 2.0), np.abs(samples).max()  # a resampler may overshoot a little
        else:
            assert np.all(np.abs(samples) <= 1.0)
            np.testing.assert_allclose(samples, want, rtol=1e-6, atol=1e-6)
        outputs.append(samples)
    else:
        tail = decoder.flush()
        assert tail.dtype == np.float32 and np.all(np.isfinite(tail))
        total_out = sum(map(len, outputs)) + len(tail)
        assert abs(total_out - total_in * 16000 / fmt.sample_rate) <= 2, (total_out, total_in)


# --- 2. one real daemon ---------------------------------------------------------------------------

MAX_FRAME = 16000  # the fuzzed daemon's audio frame limit (0.5 s of 16 kHz s16): frame_too_large above it
MAX_SIZE = 2 * MAX_FRAME  # websockets' own limit on any frame: close 1009 above it
BIG_FRAMES = (MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1, MAX_SIZE, MAX_SIZE + 1, 3 * MAX_FRAME)
GOOD_SOURCE = "fuzz-good-jfk"
GOOD_SPEED = 3.0  # the well-behaved client's pace, times real time
CASE_TIMEOUT_S = 60.0


class LoopThread:
    """An asyncio event loop on its own thread; ``run`` waits for a coroutine from another thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float):
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.thread.is_alive():
            self.run(cancel_the_rest(), 30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
        self.loop.close()


class DaemonLog:
    """The daemon's stderr, read as it comes, in entries: a log record with the lines that follow it
    (a traceback), or other output. Problems: records at ERROR and above (a connection handler that
    raised, a failed ingest, a lost task) and output that is no record (a warning, a thread's crash)."""

    RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]+) ")
    SERVING = re.compile(r"^streamd: serving .* on http://127\.0\.0\.1:(\d+)")

    def __init__(self, stream) -> None:
        self.fd = stream.fileno()
        self.entries: list[tuple[bool, str]] = []  # (a problem, its text)
        self.port: int | None = None
        self.started = threading.Event()  # the daemon said where it serves, or ended
        self._lock = threading.Lock()
        self._partial = b""
        self._traceback = False  # within a traceback that follows an entry
        self._thread = threading.Thread(target=self._read, name="fuzz-daemon-stderr", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            select.select([self.fd], [], [])
            with self._lock:  # drain() waits while a chunk is being read and taken in
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    self.started.set()
                    return
                *lines, self._partial = (self._partial + chunk).split(b"\n")
                for line in lines:
                    self._line(line.decode(errors="replace"))

    def _line(self, line: str) -> None:
        if self.port is None:  # start-up output
            if m := self.SERVING.match(line):
                self.port = int(m[1])
                self.started.set()
            else:
                self.entries.append((False, line))
        elif m := self.RECORD.match(line):
            self.entries.append((m[1] in ("ERROR", "CRITICAL"), line))
            self._traceback = False
        elif self.entries and (self._traceback or line.startswith((" ", "\t", "Traceback", "During"))):
            problem, text = self.entries[-1]  # a traceback, ending at its first line that is not indented
            self.entries[-1] = (problem, f"{text}\n{line}")
            self._traceback = line.startswith(("Traceback", " ", "\t")) or not line.strip()
        elif line.strip():
            self.entries.append((True, line))

    def drain(self, timeout: float = 5.0) -> None:
        """Until everything the daemon wrote so far has been taken in."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0") == b"\0\0\0\0":
                    return
            time.sleep(0.001)

    def problems(self, since: int = 0) -> list[str]:
        self.drain()
        return [text for problem, text in self.entries[since:] if problem]

    def text(self) -> str:
        return "\n".join(text for _, text in self.entries)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class GoodSession:
    started: float
    ended: float
    messages: list[dict]
    viewed: list[dict]
    close_code: int | None
    fuzz_cases: int  # fuzz cases that ran while this session streamed


class FuzzDaemon:
    """The daemon under test (a process), its log, the clients' event loop, the well-behaved client."""

    def __init__(self, proc: subprocess.Popen, log: DaemonLog, clients: LoopThread) -> None:
        self.proc, self.log, self.clients = proc, log, clients
        assert log.port is not None
        self.port = log.port
        self.cases = 0  # fuzz cases run so far
        self.resumed = 0  # ... of which resumed a session after the client tore its connection down
        self.sessions: list[GoodSession] = []
        self.good: concurrent.futures.Future | None = None
        self.good_failure: BaseException | None = None
        self.stop_good = threading.Event()

    def __repr__(self) -> str:  # hypothesis prints the fixture with each failing case
        return f"<FuzzDaemon pid {self.proc.pid} on port {self.port}>"

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def alive(self) -> None:
        assert self.proc.poll() is None, f"the daemon exited with {self.proc.returncode}:\n{self.log.text()[-3000:]}"

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return json.load(r)

    def fuzz_sources(self) -> list[dict]:
        """The live sources (``/v1/sources``) but the well-behaved one."""
        return [s for s in self.get("/v1/sources")["sources"] if s["id"] != GOOD_SOURCE]

    def settle(self, timeout: float = CASE_TIMEOUT_S) -> list[dict]:
        """Until every fuzz stream is finalised and gone, or waits detached for its client to resume
        it: those sources."""
        deadline = time.monotonic() + timeout
        while True:
            sources = self.fuzz_sources()
            if all(s.get("detached") for s in sources):
                return sources
            assert time.monotonic() < deadline, f"streams not finalised after {timeout:g} s: {sources}"
            time.sleep(0.01)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, as systemd stops it: it finalises every stream and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def fuzz_daemon(jfk):
    """``streamd serve`` in a process of its own: the real model and engine, a loopback port. A crash
    cannot hide (the process ends), and what it logs is read from its stderr."""
    cmd = [sys.executable, "-m", "streamd", "serve", "--port", "0", "--log-level", "warning", "--threads", "1",
           "--max-frame-bytes", str(MAX_FRAME)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}  # plain log lines on stderr
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    log = DaemonLog(proc.stderr)
    clients = None
    try:
        log.started.wait(180)
        assert log.port is not None, f"the daemon did not start ({proc.poll()}):\n{log.text()}"
        clients = LoopThread("fuzz-clients")
        fd = FuzzDaemon(proc, log, clients)
        fd.good = clients.submit(good_client(fd, load_audio(jfk)))
        yield fd
        fd.stop_good.set()
        with contextlib.suppress(BaseException):  # reported by the test that checks the good stream
            fd.good.result(120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if clients is not None:
            clients.close()
        log.join(10)
        proc.stderr.close()


async def receive_all(ws) -> list:
    out = []
    try:
        async for frame in ws:
            out.append(frame)
    except ConnectionClosed:
        pass
    return out


async def good_client(fd: FuzzDaemon, audio: np.ndarray) -> None:
    """Streams the recording again and again, at ``GOOD_SPEED`` times real time, while the fuzz cases
    run; a viewer of the same source watches each session."""
    chunk = 1600
    try:
        while True:
            started, cases = time.monotonic(), fd.cases
            async with connect(fd.url(f"/v1/captions?source={GOOD_SOURCE}"), max_size=None) as viewer:
                async with connect(fd.url("/v1/stream"), max_size=None) as ws:
                    await ws.send(json.dumps({"type": "start", "protocol": 1, "source": GOOD_SOURCE,
                                              "audio": {"encoding": "pcm_s16le", "sample_rate": 16000}}))  # fmt: skip
                    receiving = asyncio.create_task(receive_all(ws))
                    for i in range(0, len(audio), chunk):
                        delay = started + (i / 16000) / GOOD_SPEED - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        await ws.send(pcm16(audio[i : i + chunk]))
                    await ws.send(json.dumps({"type": "stop"}))
                    messages = [json.loads(m) for m in await asyncio.wait_for(receiving, 120)]
                viewed: list[dict] = []
                while not viewed or viewed[-1]["type"] != "end":
                    viewed.append(json.loads(await asyncio.wait_for(viewer.recv(), 60)))
            fd.sessions.append(GoodSession(started, time.monotonic(), messages, viewed, ws.close_code,
                                           fd.cases - cases))  # fmt: skip
            if fd.stop_good.is_set():
                return
    except BaseException as exc:
        fd.good_failure = exc
        raise


@dataclass(frozen=True)
class Resumption:
    """How a client that tore its connection down comes back (``resume`` in its start message)."""

    seq: str  # "last": the last seq it received; "zero": everything again; "ahead": past what it received
    source: str  # its start names no source, the session's, or "other" (refused: the session waits on)
    audio: dict | None  # its audio format now (any: each connection has its own)
    actions: tuple[Frame, ...]  # what it sends, before a stop


@dataclass(frozen=True)
class Case:
    """One generated connection: the first frame, what follows, and how the client ends it."""

    first: Frame
    actions: tuple[Frame, ...]
    # "stop": send a stop and read to the end; "close": close the socket; "abort": tear it down at once;
    # "abort-late": once the daemon has answered the start
    ending: str
    resume: Resumption  # when the stream waits detached after the connection: how the client comes back


STOP = Frame('{"type": "stop"}', "stop")
valid_first = dumped(valid_start())
junk_first = st.one_of(
    start_with_a_bad_field().map(lambda case: json.dumps(case[0], ensure_ascii=False)),
    dumped(),
    any_text,
    nested(max_depth=20_000),
    st.binary(max_size=64),
)
first_frames = (
    st.sampled_from([valid_first, valid_first, junk_first]).flatmap(lambda kind: kind).map(lambda d: Frame(d, "first"))
)  # two thirds valid (one_of would flatten junk_first's branches into its own)
text_frames = st.one_of(control_frames, nested(max_depth=20_000)).map(lambda text: Frame(text, "text"))
actions = st.lists(
    st.one_of(audio_frame(big=BIG_FRAMES), audio_frame(), speech_frame(), text_frames, st.just(STOP)), max_size=12
)
resumptions = st.builds(
    Resumption,
    st.sampled_from(["last", "last", "zero", "ahead"]),
    st.sampled_from(["absent", "same", "same", "other"]),
    st.one_of(st.none(), valid_start().map(lambda m: m.get("audio"))),
    st.lists(st.one_of(audio_frame(), speech_frame(), control_frames.map(lambda t: Frame(t, "text"))), max_size=6).map(
        tuple
    ),
)
cases = st.builds(
    Case,
    first_frames,
    actions.map(tuple),
    st.sampled_from(["stop", "stop", "close", "abort", "abort-late"]),
    resumptions,
)
CLEAN_RESUME = Resumption("last", "absent", None, ())


@dataclass
class Expected:
    """What the protocol says the daemon answers to a case (the close code for the endings it ends)."""

    refused: set[tuple[str, int]] | None = None  # the start's error code and close code (the choices)
    start: Start | None = None
    errors: list[set[str]] = field(default_factory=list)  # each mistake's code (the choices), in order
    close_code: int | None = None  # when the server ends the connection before the client does
    end: bool = False  # an "end" message comes last
    # A frame over websockets' limit sent after the one that ended the stream: websockets may fail
    # the connection with 1009 on it before the daemon has sent everything.
    late_oversize: bool = False
    cut: bool = False  # ended by such a frame: what the daemon had not sent yet may be lost
    ended_at: int = -1  # the index of the frame after the start that ended the stream (-1: the start)


def expect(case: Case, waiting: dict | None = None) -> Expected:
    """``waiting``: the detached session (from ``/v1/sources``) that a resume may take."""
    frames = [*case.actions, STOP] if case.ending == "stop" else list(case.actions)
    out = _expect(case.first, frames, waiting)
    out.late_oversize = any(f.size > MAX_SIZE for f in frames[out.ended_at + 1 :])
    return out


def deep(text: str | bytes) -> bool:
    """JSON nested so deep (``nested``) that whether ``json.loads`` gets to the end depends on the
    recursion limit (which hypothesis raises while it runs) and on how deep the parsing thread's
    stack already is: the daemon may answer it either way."""
    return isinstance(text, str) and text.count("[") + text.count("{") > 400


def _expect(first: Frame, frames: list[Frame], waiting: dict | None) -> Expected:
    if first.size > MAX_SIZE:
        return Expected(close_code=MESSAGE_TOO_BIG, cut=True)
    result = parse_start_or_error(first.data)
    if deep(first.data):  # parsed: what nested() made; or not JSON (RecursionError)
        parsed = "unsupported_encoding" if first.data.startswith('{"type": "start", "audio": {') else "bad_start"
        refused = {(parsed, START_CLOSE[parsed]), ("bad_start", PROTOCOL_ERROR)}
    elif isinstance(result, ProtocolError):
        refused = {(result.code, result.close_code)}
    elif result.resume is not None and (waiting is None or result.resume.session != waiting["session"]):
        refused = {("unknown_session", POLICY_VIOLATION)}
    elif result.resume is not None and result.source not in (None, waiting["id"]):
        refused = {("bad_start", PROTOCOL_ERROR)}  # not that session's source
    else:
        refused = None
    if refused is not None:
        return Expected(refused=refused, errors=[{code for code, _ in refused}])
    out = Expected(start=result)
    decoder = AudioDecoder(result.audio, MAX_FRAME)
    for i, frame in enumerate(frames):
        out.ended_at = i
        if frame.size > MAX_SIZE:
            out.close_code, out.cut = MESSAGE_TOO_BIG, True  # websockets fails the connection
            return out
        if isinstance(frame.data, str):
            code = control_oracle(frame.data)
            if code == "stop":
                out.close_code, out.end = NORMAL, True
                return out
            out.errors.append({"bad_message", "unknown_message"} if deep(frame.data) else {code})
            continue
        try:
            _, err = decoder.decode(frame.data)
        except ProtocolError as fatal:
            out.errors.append({fatal.code})
            out.close_code, out.end = fatal.close_code, True
            return out
        if err is not None:
            out.errors.append({err.code})
    out.ended_at = len(frames)
    return out


async def play(fd: FuzzDaemon, case: Case) -> tuple[list, int | None]:
    """Run one connection against the daemon: the frames it received and the close code."""
    received: list = []

    async def receive(ws) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                received.append(frame)

    async with connect(fd.url("/v1/stream"), max_size=None, ping_interval=None, close_timeout=10) as ws:
        receiving = asyncio.create_task(receive(ws))
        frames = [case.first, *case.actions] + ([STOP] if case.ending == "stop" else [])
        try:
            for frame in frames:
                await ws.send(frame.data)
        except ConnectionClosed:
            pass  # the daemon already ended the connection
        if case.ending == "abort-late":
            deadline = time.monotonic() + 10
            while not received and not receiving.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        if case.ending.startswith("abort"):
            ws.transport.abort()
        elif case.ending == "close":
            await ws.close()
        await asyncio.wait_for(receiving, CASE_TIMEOUT_S)
    return received, ws.close_code


def check_messages(frames: list) -> list[dict]:
    """Each message is JSON with a type and a seq; each error has a known code."""
    messages = []
    for frame in frames:
        assert isinstance(frame, str), f"binary message {frame[:32]!r}"
        message = json.loads(frame)
        assert isinstance(message, dict) and message.get("type") in MESSAGE_TYPES, message
        assert type(message.get("seq")) is int and message["seq"] >= 0, message
        if message["type"] == "error":
            assert message.get("code") in KNOWN_CODES, f"undefined error code: {message}"
            assert message["code"] not in FAILURE_CODES, f"client input made the daemon fail: {message}"
            assert isinstance(message.get("fatal"), bool) and isinstance(message.get("message"), str), message
            assert message["message"], message
        messages.append(message)
    return messages


def check_case(case: Case, want: Expected, frames: list, close_code: int | None) -> list[dict]:
    """The answers to ``case`` are the protocol's. When the client ends the connection itself (close,
    abort), the answers to what it sent last may be lost with it: then they must be a prefix."""
    messages = check_messages(frames)
    errors = [m["code"] for m in messages if m["type"] == "error"]

    def answered(whole: bool) -> bool:  # each mistake answered in order (all of them, or the first ones)
        want_errors = want.errors if whole else want.errors[: len(errors)]
        return len(errors) == len(want_errors) and all(e in w for e, w in zip(errors, want_errors, strict=True))

    # Strict when the client reads until the daemon closes (and websockets did not cut that short).
    strict = case.ending == "stop" and not want.cut and not (want.late_oversize and close_code == MESSAGE_TOO_BIG)
    if case.ending == "stop" and want.cut:
        assert close_code == MESSAGE_TOO_BIG, close_code
    assert close_code in CLOSE_CODES | ({1006} if case.ending.startswith("abort") else set()), close_code
    if want.start is None:  # refused before a stream began: one error (none when the frame was too big)
        assert len(messages) == len(errors) and answered(whole=False), messages
        assert all(m["fatal"] and m["seq"] == 0 for m in messages), messages
        if strict and want.refused:
            assert len(errors) == 1 and (errors[0], close_code) in want.refused, (messages, close_code)
        elif strict:
            assert (errors, close_code) == ([], want.close_code), (messages, close_code)
        return messages
    assert messages or not strict, "a valid start was not answered"
    if messages:
        ready = messages[0]
        assert ready["type"] == "ready" and ready["seq"] == 0 and ready["protocol"] == 1, ready
        assert valid_session(ready["session"]) and valid_source(ready["source"]), ready
        assert want.start.source is None or ready["source"] == want.start.source, ready
        assert ready.get("resumed", False) is (want.start.resume is not None), ready
        seqs = [m["seq"] for m in messages]
        assert seqs == sorted(set(seqs)), seqs  # increasing
        assert "ready" not in [m["type"] for m in messages[1:]], messages
        assert "end" not in [m["type"] for m in messages[:-1]], messages
    # Every mistake is answered, in order, and nothing else is an error.
    assert answered(whole=False), (errors, want.errors)
    fatal = [m["code"] for m in messages if m["type"] == "error" and m["fatal"]]
    assert fatal in ([], ["frame_too_large"]), fatal
    if strict:
        assert close_code == want.close_code, (close_code, want.close_code)
        if want.end:  # stopped, or a fatal frame: every answer, then the end
            assert answered(whole=True), (errors, want.errors)
            assert messages[-1]["type"] == "end", messages[-3:]
    return messages


def resume(fd: FuzzDaemon, plan: Resumption, waiting: dict, before: list[dict]) -> list[dict]:
    """Come back to the detached session ``waiting`` as ``plan`` says, having received ``before``;
    check the answers; return every message received on the session so far."""
    last = max((m["seq"] for m in before), default=0)
    seq = {"last": last, "zero": 0, "ahead": last + 3}[plan.seq]
    msg: dict = {"type": "start", "resume": {"session": waiting["session"], "seq": seq}}
    if plan.source != "absent":
        msg["source"] = waiting["id"] if plan.source == "same" else f"other-{waiting['session']}"
    if plan.audio is not None:
        msg["audio"] = plan.audio
    case = Case(Frame(json.dumps(msg), "resume"), plan.actions, "stop", CLEAN_RESUME)
    want = expect(case, waiting)
    frames, close_code = fd.clients.run(play(fd, case), CASE_TIMEOUT_S + 15)
    messages = check_case(case, want, frames, close_code)
    if want.start is None:  # refused (another source): the session still waits
        assert [s["session"] for s in fd.settle()] == [waiting["session"]], "a refused resume ended the session"
        return resume(fd, CLEAN_RESUME, waiting, before)
    ready = messages[0]
    assert (ready["session"], ready["source"]) == (waiting["session"], waiting["id"]), ready
    assert type(ready.get("last_seq")) is int and ready["last_seq"] >= last, ready
    # The finals it missed come again first (as first numbered), then the stream goes on.
    replayed = [m for m in messages[1:] if m["seq"] <= ready["last_seq"]]
    assert all(m["type"] == "final" and m["seq"] > seq for m in replayed), replayed
    live = messages[1 + len(replayed) :]
    assert all(m["seq"] > ready["last_seq"] for m in live), live
    session = [m for m in before if m["type"] != "end"] + messages[1:]
    if plan.seq != "ahead":  # no final was lost: their segments count up from 0 without a gap
        finals = {m["seq"]: m for m in session if m["type"] == "final"}
        for m in session:
            assert m["type"] != "final" or finals[m["seq"]] == m, "a final replayed differently"
        segments = [finals[k]["segment"] for k in sorted(finals)]
        assert segments == list(range(len(segments))), segments
    return session


async def end_session(fd: FuzzDaemon, waiting: dict) -> None:
    """Resume a detached session and stop it, whatever came before (a failed case leaves it waiting)."""
    async with connect(fd.url("/v1/stream"), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "resume": {"session": waiting["session"], "seq": 0}}))
        await ws.send(STOP.data)
        await receive_all(ws)


# Regressions, always run: the start's error is a close reason over 123 bytes of UTF-8 (the
# handler raised, close 1011); a RecursionError in parse_control ended the stream with internal_error.
LONG_REASON = Case(Frame('{"type": "start", "source": "' + "中" * 50 + '"}', "first"), (), "stop", CLEAN_RESUME)
DEEP_CONTROL = Case(Frame('{"type": "start"}', "first"), (Frame("[" * 5000, "text"), STOP), "close", CLEAN_RESUME)


@fuzz(3)
@given(case=cases)
@example(case=LONG_REASON)
@example(case=DEEP_CONTROL)
def test_stream_clients_get_a_defined_answer_to_anything(fuzz_daemon, case):
    fd = fuzz_daemon
    fd.alive()
    for leftover in fd.settle():  # from a case that failed
        fd.clients.run(end_session(fd, leftover), CASE_TIMEOUT_S)
    assert not fd.settle()
    fd.log.drain()
    logged = len(fd.log.entries)
    fd.cases += 1
    want = expect(case)
    event(f"start: {'refused' if want.refused else 'too big' if want.cut and not want.start else 'a stream'}")
    event(f"ending: {case.ending}")
    frames, close_code = fd.clients.run(play(fd, case), CASE_TIMEOUT_S + 15)
    messages = check_case(case, want, frames, close_code)
    for waiting in fd.settle():  # the client went away without a stop: it comes back
        assert case.ending.startswith("abort") or close_code == MESSAGE_TOO_BIG, (case.ending, close_code, waiting)
        fd.resumed += 1
        event("resumed after the connection dropped")
        mine = bool(messages) and messages[0].get("session") == waiting["session"]
        resume(fd, case.resume, waiting, messages if mine else [])
    assert not fd.settle(), "a resumed session was not finalised after its stop"
    assert not fd.log.problems(logged), fd.log.problems(logged)


viewer_frames = st.lists(st.one_of(st.binary(max_size=64), odd_text, control_frames), max_size=5)


@fuzz(0.5)
@given(source=st.one_of(odd_text, st.from_regex(SOURCE_RE, fullmatch=True)), frames=viewer_frames)
@example(source="room\n", frames=[])
@example(source="", frames=["x"])
def test_viewers_get_a_defined_answer_to_anything(fuzz_daemon, source, frames):
    """``/v1/captions?source=…`` with any source and anything sent: a viewer, answered ``read_only``
    per frame, or refused with ``bad_request``."""
    fd = fuzz_daemon
    if source == GOOD_SOURCE:
        return
    fd.log.drain()
    logged = len(fd.log.entries)

    async def view() -> tuple[list, int | None]:
        async with connect(fd.url(f"/v1/captions?source={quote(source, safe='')}"), max_size=None) as ws:
            if not valid_source(source):
                return await receive_all(ws), ws.close_code  # refused at once
            received = []
            for frame in frames:
                await ws.send(frame)
            while len(received) < len(frames):  # every frame answered
                received.append(await asyncio.wait_for(ws.recv(), 10))
            await ws.close()
        return received + await receive_all(ws), ws.close_code

    received, close_code = fd.clients.run(view(), CASE_TIMEOUT_S)
    assert not fd.log.problems(logged), fd.log.problems(logged)
    messages = check_messages(received)
    if valid_source(source):
        assert [m["code"] for m in messages] == ["read_only"] * len(frames), messages
        assert all(not m["fatal"] for m in messages) and close_code == NORMAL, (messages, close_code)
    else:
        assert [(m["code"], m["fatal"]) for m in messages] == [("bad_request", True)], messages
        assert close_code == POLICY_VIOLATION, close_code


# --- 3. the well-behaved stream lost nothing (keep this test last: it ends that client) -----------

normalise = EnglishTextNormalizer()


def test_the_well_behaved_stream_lost_nothing_while_fuzzed(fuzz_daemon, jfk: Path):
    fd = fuzz_daemon
    fd.stop_good.set()
    assert fd.good is not None
    try:
        fd.good.result(180)
    except BaseException:
        raise AssertionError(f"the well-behaved client failed: {fd.good_failure!r}") from fd.good_failure
    assert fd.sessions, "no session of the well-behaved client completed"
    ref = normalise(reference(jfk))
    for n, s in enumerate(fd.sessions):
        types = [m["type"] for m in s.messages]
        assert types[0] == "ready" and types[-1] == "end" and "error" not in types, (n, s.messages)
        assert s.close_code == NORMAL, (n, s.close_code)
        text = " ".join(m["text"] for m in s.messages if m["type"] == "final")
        assert jiwer.wer(ref, normalise(text)) <= 0.2, (n, text)
        # Its viewer saw the same finals and the end.
        assert [m for m in s.viewed if m["type"] == "final"] == [m for m in s.messages if m["type"] == "final"], n
        assert s.viewed[-1]["type"] == "end"
    if fd.cases:
        assert any(s.fuzz_cases for s in fd.sessions), "the fuzz cases did not overlap the well-behaved stream"
    for leftover in fd.settle():  # from a case that failed
        fd.clients.run(end_session(fd, leftover), CASE_TIMEOUT_S)
    assert not fd.settle()
    health = fd.get("/healthz")
    print(f"fuzz cases {fd.cases} ({fd.resumed} resumed), well-behaved sessions {len(fd.sessions)}, "
          f"engine jobs {health.get('engine', {}).get('jobs')}")  # fmt: skip
    assert health["status"] == "ok" and health["streams"] == [], health
    assert fd.stop() == 0, fd.log.text()[-3000:]  # SIGTERM: a clean exit
    assert not fd.log.problems(), fd.log.problems()
