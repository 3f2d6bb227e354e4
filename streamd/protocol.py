"""Protocol v1, sans I/O: the client's start frame, its audio frames, and the server's messages.

Nothing here touches a socket. The server reads a frame, hands it to :func:`parse_start`,
:func:`parse_control` or an :class:`AudioDecoder`, and sends what :func:`message` builds; a
client mistake comes back as a :class:`ProtocolError` that says what was wrong, whether the
stream can go on, and the close code when it cannot.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from http import HTTPStatus
from urllib.parse import parse_qs

import numpy as np
import soxr

from .audio import SAMPLE_RATE
from .stream import Event, Final, Partial, UtteranceEnd, VadChange

__all__ = [
    "ENCODINGS",
    "PROTOCOL_VERSION",
    "AudioDecoder",
    "AudioFormat",
    "ProtocolError",
    "Resume",
    "Start",
    "bad_query_source",
    "bad_source",
    "event_message",
    "in_range",
    "parse_control",
    "parse_start",
    "with_query_source",
]

PROTOCOL_VERSION = 1
ENCODINGS = {
    "pcm_s16le": np.dtype("<i2"),
    "pcm_f32le": np.dtype("<f4"),
    "mulaw": np.dtype("u1"),  # G.711 (telephony)
    "alaw": np.dtype("u1"),
}


def _g711_tables() -> dict[str, np.ndarray]:
    """G.711 (telephony, 8 kHz: what OpenAI Realtime calls ``audio/pcmu``/``pcma`` and Deepgram
    ``mulaw``/``alaw``) byte → float sample, by ITU-T G.711's expansion rules."""
    b = np.arange(256)
    u = ~b & 0xFF
    mu = (((u & 0x0F) << 3) + 0x84 << ((u >> 4) & 7)) - 0x84
    mu = np.where(u & 0x80, -mu, mu)
    a = b ^ 0x55
    exponent, mantissa = (a >> 4) & 7, a & 0x0F
    mag = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    al = np.where(a & 0x80, mag, -mag)
    return {"mulaw": (mu / 32768).astype(np.float32), "alaw": (al / 32768).astype(np.float32)}


G711 = _g711_tables()
MIN_RATE, MAX_RATE = 8000, 192000
MAX_CHANNELS = 8
# \Z, not $: "$" also matches before a trailing newline, which let "room-1\n" through.
SOURCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
SESSION_ID = re.compile(r"^[0-9a-f]{12}\Z")  # what Source makes: uuid4().hex[:12]

# Close codes (RFC 6455).
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
TRY_AGAIN_LATER = 1013


class ProtocolError(Exception):
    """A client mistake: ``code`` for programs, the message for people. A fatal one ends the
    connection with ``close_code``; a non-fatal one is reported and the stream goes on."""

    def __init__(self, code: str, message: str, fatal: bool = False, close_code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal
        self.close_code = close_code

    def message(self) -> dict:
        return {"type": "error", "code": self.code, "message": str(self), "fatal": self.fatal}


@dataclass(frozen=True)
class AudioFormat:
    encoding: str = "pcm_s16le"
    sample_rate: int = SAMPLE_RATE
    channels: int = 1

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample of every channel."""
        return ENCODINGS[self.encoding].itemsize * self.channels


@dataclass(frozen=True)
class Start:
    source: str | None
    audio: AudioFormat
    language: str = "en"
    resume: Resume | None = None  # the optional session-resume extension


@dataclass(frozen=True)
class Resume:
    """``"resume": {"session": ..., "seq": N}`` in a start message: continue that session, and
    send again its finals numbered after ``seq`` (the last message the client saw)."""

    session: str
    seq: int


def _bad_start(message: str, close_code: int = PROTOCOL_ERROR) -> ProtocolError:
    return ProtocolError("bad_start", message, fatal=True, close_code=close_code)


def _unsupported(code: str, message: str) -> ProtocolError:
    """A well-formed start asking for something this server does not do."""
    return ProtocolError(code, message, fatal=True, close_code=UNSUPPORTED_DATA)


def parse_start(frame: str | bytes, languages: tuple[str, ...] = ("en",)) -> Start:
    """The first frame of ``/v1/stream``: a JSON ``start`` message."""
    if isinstance(frame, bytes):
        raise _bad_start('the first frame must be a text {"type": "start", ...} message, not binary audio')
    try:
        msg = json.loads(frame)
    except (ValueError, RecursionError):  # deeply nested JSON ("[[[[...") exhausts the recursion limit
        raise _bad_start('the first frame is not JSON: expected {"type": "start", "protocol": 1, ...}') from None
    if not isinstance(msg, dict) or msg.get("type") != "start":
        raise _bad_start(f'the first message must have "type": "start", got {_type_of(msg)}')
    if msg.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise _bad_start(
            f"unsupported protocol {msg.get('protocol')!r}: this server speaks protocol {PROTOCOL_VERSION}"
        )
    source = msg.get("source")
    if source is not None and (not isinstance(source, str) or not SOURCE_ID.match(source)):
        raise _bad_start(bad_source(source))
    language = msg.get("language", "en")
    if language not in languages:
        raise _unsupported(
            "unsupported_language",
            f"language {language!r} is not supported by this model (supported: {', '.join(languages)})",
        )
    return Start(source, _parse_audio(msg.get("audio", {})), language, _parse_resume(msg.get("resume")))


def _parse_resume(resume: object) -> Resume | None:
    if resume is None:
        return None
    if not isinstance(resume, dict):
        raise _bad_start('"resume" must be an object like {"session": "…", "seq": 17}')
    session, seq = resume.get("session"), resume.get("seq", 0)
    if not isinstance(session, str) or not SESSION_ID.match(session):
        raise _bad_start(f'bad resume session {session!r}: the "session" of a ready message')
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**53:
        raise _bad_start(f'bad resume seq {seq!r}: the "seq" of the last message received, 0 or more')
    return Resume(session, seq)


def in_range(value: object, low: int, high: int) -> bool:
    """An integer (not a bool) from ``low`` to ``high``: a sample rate or a channel count, as
    every protocol's audio format names them."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _parse_audio(audio: object) -> AudioFormat:
    if not isinstance(audio, dict):
        raise _bad_start('"audio" must be an object like {"encoding": "pcm_s16le", "sample_rate": 16000, ...}')
    encoding = audio.get("encoding", "pcm_s16le")
    if not isinstance(encoding, str) or encoding not in ENCODINGS:  # a list or object is unhashable
        raise _unsupported(
            "unsupported_encoding", f"unknown audio encoding {encoding!r}: use one of {', '.join(ENCODINGS)}"
        )
    rate, channels = audio.get("sample_rate", SAMPLE_RATE), audio.get("channels", 1)
    if not in_range(rate, MIN_RATE, MAX_RATE):
        raise _unsupported(
            "unsupported_audio", f"sample_rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz, got {rate!r}"
        )
    if not in_range(channels, 1, MAX_CHANNELS):
        raise _unsupported(
            "unsupported_audio", f"channels must be an integer from 1 to {MAX_CHANNELS}, got {channels!r}"
        )
    return AudioFormat(encoding, rate, channels)


def parse_control(frame: str) -> str:
    """A text frame after the start: only ``{"type": "stop"}`` is defined. Returns the type."""
    try:
        msg = json.loads(frame)
    except (ValueError, RecursionError):  # deeply nested JSON ("[[[[...") exhausts the recursion limit
        raise ProtocolError(
            "bad_message", "text frame is not JSON: audio goes in binary frames, control messages are JSON"
        ) from None
    kind = msg.get("type") if isinstance(msg, dict) else None
    if kind != "stop":
        raise ProtocolError("unknown_message", f'unknown message {_type_of(msg)}: only {{"type": "stop"}} is defined')
    return kind


def _type_of(msg: object) -> str:
    if isinstance(msg, dict):
        return f"type {msg.get('type')!r}" if "type" in msg else "an object without a type"
    return f"a JSON {type(msg).__name__}"


def bad_source(source: object) -> str:
    """What is wrong with a source id that does not match ``SOURCE_ID``, wherever it came from."""
    return f"bad source {source!r}: 1-64 letters, digits and . _ : -, starting with a letter or digit"


def bad_query_source(path: str, query: str) -> tuple[HTTPStatus, str] | None:
    """``/v1/stream?source=`` with an id that is not one: the handshake's 400, or ``None``."""
    source = parse_qs(query).get("source", [None])[0]
    if path != "/v1/stream" or source is None or SOURCE_ID.match(source):
        return None
    err = _bad_start(bad_source(source))
    return HTTPStatus.BAD_REQUEST, json.dumps(err.message())


def with_query_source(start: Start, query: str) -> Start:
    """``/v1/stream?source=ID`` names the source before the first frame (a proxy routes by it);
    the start message may name it too, but not another."""
    source = parse_qs(query).get("source", [None])[0]
    if source is None:
        return start
    if start.source is not None and start.source != source:
        raise _bad_start(f"the start message names source {start.source!r}, the URL {source!r}")
    return replace(start, source=source)


class AudioDecoder:
    """Binary audio in the client's format → 16 kHz mono float32, resampled as a stream.

    Websocket frames are whole messages, so a frame that is not a whole number of samples is
    the client's bug: its whole samples are kept and the error says how many bytes were
    dropped. A byte stream (TCP ingest) splits samples anywhere: ``carry=True`` keeps the
    remainder for the next chunk instead.
    """

    def __init__(self, fmt: AudioFormat, max_frame_bytes: int | None = None, carry: bool = False) -> None:
        self.format = fmt
        self.max_frame_bytes = max_frame_bytes
        self.carry = carry
        self._dtype = ENCODINGS[fmt.encoding]
        self._scale = 1 / 32768 if fmt.encoding == "pcm_s16le" else 1.0
        self._pending = b""
        self._resampler = (
            None if fmt.sample_rate == SAMPLE_RATE else soxr.ResampleStream(fmt.sample_rate, SAMPLE_RATE, 1)
        )

    def decode(self, frame: bytes) -> tuple[np.ndarray, ProtocolError | None]:
        """Samples of one frame, and a non-fatal error to report (or raises a fatal one)."""
        if self.max_frame_bytes is not None and len(frame) > self.max_frame_bytes:
            raise ProtocolError(
                "frame_too_large",
                f"audio frame of {len(frame)} bytes exceeds the limit of {self.max_frame_bytes} bytes: "
                "send at most 1 s per frame",
                fatal=True,
                close_code=MESSAGE_TOO_BIG,
            )
        data, error = self._pending + frame, None
        whole = len(data) - len(data) % self.format.frame_bytes
        if self.carry:
            self._pending = data[whole:]
        elif whole < len(data):
            error = ProtocolError(
                "bad_audio",
                f"audio frame of {len(frame)} bytes is not a whole number of {self.format.frame_bytes}-byte "
                f"samples ({self.format.encoding}, {self.format.channels} channel(s)): "
                f"dropped the last {len(data) - whole} bytes",
            )
        raw = np.frombuffer(data[:whole], dtype=self._dtype)
        if self.format.encoding in G711:
            samples = G711[self.format.encoding][raw]  # a table lookup: a new array
        elif self._scale != 1.0:
            samples = raw.astype(np.float32)
            samples *= np.float32(self._scale)
        else:
            samples = raw.astype(np.float32)
            # Float PCM: non-finite samples are reported and replaced; finite ones are clipped to the
            # protocol's [-1, 1] like any PCM path. Huge finite ones (|x| > ~1e19) overflowed the mel's
            # power spectrum to inf and fed NaN to the engine, and summing channels could overflow.
            if not np.all(np.isfinite(samples)):
                samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
                error = ProtocolError(
                    "bad_audio", "audio frame holds NaN or infinite samples: replaced by silence/clipped"
                )
            np.clip(samples, -1.0, 1.0, out=samples)
        if self.format.channels > 1:
            samples = samples.reshape(-1, self.format.channels).mean(axis=1, dtype=np.float32)
        return self._resample(samples), error

    def flush(self) -> np.ndarray:
        """What the resampler still holds, at the end of the stream."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._resampler.resample_chunk(np.zeros(0, np.float32), last=True).astype(np.float32, copy=False)

    def _resample(self, samples: np.ndarray) -> np.ndarray:
        if self._resampler is None or not len(samples):
            return samples
        return self._resampler.resample_chunk(samples).astype(np.float32, copy=False)


def _seconds(t: float) -> float:
    return round(float(t), 3)


def event_message(event: Event) -> dict:
    """The protocol message for a stream event (without ``seq``: the publisher numbers them)."""
    if isinstance(event, Final):
        message = {
            "type": "final",
            "segment": event.segment,
            "start": _seconds(event.start),
            "end": _seconds(event.end),
            "text": event.text,
            "words": [
                {"word": w.word, "start": _seconds(w.start), "end": _seconds(w.end), "p": round(float(w.p), 3)}
                for w in event.words
            ],
        }
        if event.closes:
            message["closes"] = True
        return message
    if isinstance(event, Partial):
        return {
            "type": "partial",
            "segment": event.segment,
            "start": _seconds(event.start),
            "end": _seconds(event.end),
            "text": event.text,
        }
    if isinstance(event, VadChange):
        return {"type": "vad", "speech": event.speech, "t": _seconds(event.t)}
    if isinstance(event, UtteranceEnd):
        return {"type": "utterance_end", "t": _seconds(event.t)}
    raise TypeError(f"not a stream event: {event!r}")
