"""Deepgram's live transcription API: ``ws /v1/listen``, as the Deepgram SDKs call it.

An app written against Deepgram (its SDKs, or the many tools that speak ``/v1/listen``) points
its base URL here. The stream is a :class:`~streamd.hub.Source` like any other; this module maps
the wire format onto it:

- the query (``encoding``, ``sample_rate``, ``channels``, ``interim_results``, ``endpointing``,
  ``utterance_end_ms``, ``vad_events``, ``language``, ``model``) → :class:`ListenOptions`, checked
  in the handshake so that a bad one gets Deepgram's HTTP 400;
- binary frames are audio; text frames ``KeepAlive``, ``Finalize`` (the open utterance ends now:
  its results carry ``from_finalize``) and ``CloseStream`` (the last results, ``Metadata``, close);
- hub messages → :class:`ListenRenderer`: ``partial`` → interim ``Results``, ``final`` →
  ``Results`` with ``is_final`` (``speech_final`` on the utterance's last), ``vad`` →
  ``SpeechStarted``, ``utterance_end`` → ``UtteranceEnd``, ``end`` → ``Metadata``.

Endpointing is our VAD's (its silence rule holds whatever ``endpointing`` says, except
``endpointing=false``, which turns ``speech_final`` off); Whisper punctuates, so ``punctuate`` and
``smart_format`` change nothing. Raw audio (``linear16``, ``linear32``, ``mulaw``, ``alaw``, at
``sample_rate``), or, as Deepgram takes it, containerized audio with no ``encoding`` (a browser's
MediaRecorder WebM/Opus, Ogg/Opus, FLAC, MP3, ...; ``encoding=opus`` / ``ogg-opus`` / ``flac``
too), decoded as it arrives by FFmpeg (:class:`~streamd.container.ContainerStream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from .audio import SAMPLE_RATE, AudioError
from .container import ContainerStream
from .hub import Outbox, Source, control_message
from .protocol import (
    MAX_CHANNELS,
    MAX_RATE,
    MIN_RATE,
    POLICY_VIOLATION,
    SOURCE_ID,
    AudioDecoder,
    AudioFormat,
    ProtocolError,
    bad_source,
)
from .sender import WebsocketTransport

if TYPE_CHECKING:
    from .server import Daemon

__all__ = ["PATH", "ListenError", "ListenOptions", "ListenRenderer", "Received", "parse_query", "serve"]

PATH = "/v1/listen"
ENCODINGS = {"linear16": "pcm_s16le", "linear32": "pcm_f32le", "mulaw": "mulaw", "alaw": "alaw"}
CONTAINED = ("opus", "ogg-opus", "flac")  # encodings that come in a container FFmpeg finds by itself
LANGUAGES = ("en", "en-US", "en-GB", "en-AU", "en-IN", "en-NZ")  # English, as tiny.en hears it


class ListenError(Exception):
    """A query Deepgram would refuse: HTTP 400 in the handshake, with its JSON body."""

    def body(self, request_id: str) -> str:
        return json.dumps({"err_code": "Bad Request", "err_msg": str(self), "request_id": request_id})


@dataclass(frozen=True)
class ListenOptions:
    audio: AudioFormat | None  # None: containerized audio (WebM, Ogg, ...), its format in the data
    model: str = "streamd"
    interim_results: bool = False
    endpointing: bool = True
    utterance_end_ms: int | None = None
    vad_events: bool = False
    source: str | None = None  # streamd's own: the source id the viewers of /v1/captions name


def parse_query(query: str, default_model: str = "streamd") -> ListenOptions:
    """``/v1/listen``'s query string as options, or a :class:`ListenError` saying what is wrong."""
    q = {k: v[-1] for k, v in parse_qs(query).items()}

    def boolean(name: str, default: bool) -> bool:
        value = q.get(name, str(default)).lower()
        if value not in ("true", "false"):
            raise ListenError(f"{name} must be true or false, got {q[name]!r}")
        return value == "true"

    def integer(name: str, default: int, low: int, high: int) -> int:
        value = q.get(name, str(default))
        if not re.fullmatch(r"\d{1,9}", value) or not low <= int(value) <= high:
            raise ListenError(f"{name} must be an integer from {low} to {high}, got {value!r}")
        return int(value)

    encoding = q.get("encoding")
    if encoding is not None and encoding not in ENCODINGS and encoding not in CONTAINED:
        raise ListenError(f"encoding {encoding!r} is not supported: use one of {', '.join([*ENCODINGS, *CONTAINED])}, "
                          "or none for containerized audio (WebM, Ogg, WAV, MP3)")  # fmt: skip
    audio = None
    if encoding in ENCODINGS:
        rate = integer("sample_rate", 8000 if encoding in ("mulaw", "alaw") else 16000, MIN_RATE, MAX_RATE)
        audio = AudioFormat(ENCODINGS[encoding], rate, integer("channels", 1, 1, MAX_CHANNELS))
    if boolean("multichannel", False):
        raise ListenError("multichannel=true is not supported: channels are mixed to one transcript")
    language = q.get("language", "en")
    if language not in LANGUAGES:
        raise ListenError(f"language {language!r} is not supported by this model: English only "
                          f"({', '.join(LANGUAGES)})")  # fmt: skip
    endpointing = q.get("endpointing", "10").lower() != "false"
    if endpointing and q.get("endpointing", "10").lower() != "true":
        integer("endpointing", 10, 0, 60000)
    utterance_end = None
    if "utterance_end_ms" in q:
        utterance_end = integer("utterance_end_ms", 1000, 1000, 60000)
    source = q.get("source")
    if source is not None and not SOURCE_ID.match(source):
        raise ListenError(bad_source(source))
    return ListenOptions(
        audio, q.get("model", default_model),
        boolean("interim_results", False), endpointing, utterance_end, boolean("vad_events", False), source,
    )  # fmt: skip


def refusal(path: str, query: str) -> tuple[HTTPStatus, str] | None:
    """The handshake's answer to a bad query (what Deepgram answers), or ``None``."""
    if path != PATH:
        return None
    try:
        parse_query(query)
    except ListenError as err:
        return HTTPStatus.BAD_REQUEST, err.body(str(uuid.uuid4()))
    return None


class Received:
    """The audio a connection sent, for ``Metadata``: its SHA-256 and its length (of raw audio,
    from the byte count; of a container, what was decoded from it)."""

    def __init__(self, audio: AudioFormat | None) -> None:
        self.audio = audio
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.decoded_s = 0.0
        self.channels = audio.channels if audio is not None else 1

    def add(self, frame: bytes) -> None:
        self.sha256.update(frame)
        self.bytes += len(frame)

    @property
    def seconds(self) -> float:
        if self.audio is None:
            return self.decoded_s
        return self.bytes / self.audio.frame_bytes / self.audio.sample_rate


def _word(word: dict) -> dict:
    punctuated = word["word"].strip()
    bare = re.sub(r"[^\w'-]", "", punctuated.lower()) or punctuated.lower()
    return {"word": bare, "start": word["start"], "end": word["end"], "confidence": word["p"],
            "punctuated_word": punctuated}  # fmt: skip


class ListenRenderer:
    """Hub messages (and ``finalize`` control messages) → Deepgram's server messages, in order."""

    def __init__(self, options: ListenOptions, received: Received, request_id: str | None = None) -> None:
        self.options = options
        self.received = received
        self.request_id = request_id or str(uuid.uuid4())
        self.model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, "streamd:" + options.model))
        self._finalizing = False
        self._spoken = False  # a final of the current utterance went out without speech_final
        self._last_word_end = 0.0

    def render(self, msg: dict) -> list[str]:
        return [json.dumps(m) for m in self._messages(msg)]

    def _messages(self, msg: dict) -> list[dict]:
        control, kind = msg.get("control"), msg.get("type")
        if control == "finalize":
            self._finalizing = True
            return []
        if control == "finalize_done":  # (its utterance_end, if speech was open, came before)
            self._finalizing = False
            return []
        if kind == "partial" and self.options.interim_results:
            return [self._results(msg["start"], msg["end"], msg["text"], [], False, False)]
        if kind == "final":
            words = [_word(w) for w in msg["words"]]
            closes = bool(msg.get("closes")) and self.options.endpointing
            self._spoken = not closes
            self._last_word_end = msg["end"]
            result = self._results(msg["start"], msg["end"], msg["text"], words, True, closes)
            if closes:
                self._finalizing = False
            return [result]
        if kind == "vad" and msg["speech"] and self.options.vad_events:
            return [{"type": "SpeechStarted", "channel": [0], "timestamp": msg["t"]}]
        if kind == "utterance_end":
            out = []
            if self._spoken and self.options.endpointing:  # the utterance's last final did not say so
                out.append(self._results(msg["t"], msg["t"], "", [], True, True))
            self._spoken = False
            if self.options.utterance_end_ms is not None:
                out.append({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": self._last_word_end})
            return out
        if kind == "error":
            return [{"type": "Error", "variant": msg["code"], "description": msg["message"],
                     "message": msg["message"], "code": msg["code"]}]  # fmt: skip
        if kind == "end":
            return [{"type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id,
                     "sha256": self.received.sha256.hexdigest(), "created": _now(),
                     "duration": round(self.received.seconds, 3), "channels": self.received.channels,
                     "models": [self.model_uuid],
                     "model_info": {self.model_uuid: self._model_info()}}]  # fmt: skip
        return []

    def _results(self, start: float, end: float, text: str, words: list[dict], final: bool, speech_final: bool) -> dict:
        confidence = round(sum(w["confidence"] for w in words) / len(words), 3) if words else (1.0 if text else 0.0)
        return {
            "type": "Results", "channel_index": [0, 1], "duration": round(max(0.0, end - start), 3),
            "start": start, "is_final": final, "speech_final": speech_final,
            "channel": {"alternatives": [{"transcript": text, "confidence": confidence, "words": words}]},
            "metadata": {"request_id": self.request_id, "model_info": self._model_info(),
                         "model_uuid": self.model_uuid},
            "from_finalize": final and self._finalizing,
        }  # fmt: skip

    def _model_info(self) -> dict:
        return {"name": self.options.model, "version": "streamd", "arch": "whisper"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


async def serve(daemon: Daemon, ws: ServerConnection) -> None:
    """One ``/v1/listen`` connection: a live source until ``CloseStream``, a drop or shutdown."""
    options = parse_query(urlsplit(ws.request.path).query, daemon.engine.model_name)  # (the handshake checked it)
    received = Received(options.audio)
    renderer = ListenRenderer(options, received)

    async def read(source: Source, outbox: Outbox) -> ProtocolError | None:
        audio = _RawAudio(daemon, source, options.audio) if options.audio else _ContainedAudio(daemon, source, received)
        try:
            with contextlib.suppress(ConnectionClosed):
                async for frame in ws:
                    if isinstance(frame, bytes):
                        if not frame:  # Deepgram's older way to say CloseStream
                            break
                        received.add(frame)
                        await audio.write(frame)
                        continue
                    kind = _control(frame)
                    if kind == "CloseStream":
                        break
                    if kind == "Finalize":
                        await audio.settle()
                        outbox.put(control_message("finalize"))
                        await daemon.cut(source)
                        outbox.put(control_message("finalize_done"))
                    elif kind != "KeepAlive":
                        err = ProtocolError("unknown_message", f"unknown message {kind or frame[:40]!r}: send audio "
                                            "as binary frames, or KeepAlive, Finalize, CloseStream")  # fmt: skip
                        daemon.metrics.errors.labels(err.code).inc()
                        source.error(err)
            await audio.end()
        except ProtocolError as fatal:
            daemon.metrics.errors.labels(fatal.code).inc()
            source.error(fatal)
            return fatal
        finally:
            audio.abort()
        return None

    transport = WebsocketTransport(ws, daemon.config.slow_client_grace_s)
    fatal = await daemon.serve_live("deepgram", options.source, transport, renderer.render, read)
    if fatal is not None:
        await ws.close(fatal.close_code, str(fatal)[:120])
    else:
        await ws.close(CloseCode.GOING_AWAY if daemon.stopping else CloseCode.NORMAL_CLOSURE)


class _RawAudio:
    """Raw samples in the query's format, decoded frame by frame."""

    def __init__(self, daemon: Daemon, source: Source, fmt: AudioFormat) -> None:
        self.daemon, self.source, self.format = daemon, source, fmt
        self.decoder = AudioDecoder(fmt, daemon.config.max_frame_bytes, carry=True)

    async def write(self, frame: bytes) -> None:
        samples, _ = self.decoder.decode(frame)
        await self.daemon.feed(self.source, samples)

    async def settle(self) -> None:
        """Everything sent so far is in the stream (a Finalize)."""
        await self.daemon.feed(self.source, self.decoder.flush())
        self.decoder = AudioDecoder(self.format, self.daemon.config.max_frame_bytes, carry=True)

    async def end(self) -> None:
        await self.daemon.feed(self.source, self.decoder.flush())

    def abort(self) -> None:
        pass


class _ContainedAudio:
    """A container's bytes, decoded as they arrive by FFmpeg on its own thread; a task feeds what
    comes out into the stream (and waits for the engine, as a raw stream's reader does)."""

    def __init__(self, daemon: Daemon, source: Source, received: Received) -> None:
        self.daemon, self.source, self.received = daemon, source, received
        self.container = ContainerStream()
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for samples in self.container.blocks():
            self.received.decoded_s += len(samples) / SAMPLE_RATE
            await self.daemon.feed(self.source, samples)

    async def write(self, frame: bytes) -> None:
        if len(frame) > self.daemon.config.max_frame_bytes:
            raise ProtocolError("frame_too_large", f"audio frame of {len(frame)} bytes exceeds the limit of "
                                f"{self.daemon.config.max_frame_bytes} bytes", fatal=True)  # fmt: skip
        if self.pump.done():
            await self._check()
        try:
            self.container.write(frame)
        except AudioError as e:
            raise ProtocolError("bad_audio", str(e), fatal=True) from None

    async def settle(self) -> None:
        await self.container.settled()
        if self.pump.done():
            await self._check()

    async def end(self) -> None:
        self.container.close()
        await self._check()

    async def _check(self) -> None:
        try:
            await self.pump
        except AudioError as e:
            # (1008, as Deepgram closes on audio it cannot decode: "DATA-0000")
            raise ProtocolError("bad_audio", f"{e}: send containerized audio (WebM, Ogg, WAV, MP3), or raw "
                                "samples with encoding and sample_rate", True, POLICY_VIOLATION) from None  # fmt: skip

    def abort(self) -> None:
        self.container.abort()
        self.pump.cancel()


def _control(frame: str) -> str | None:
    try:
        msg = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    return msg.get("type") if isinstance(msg, dict) and isinstance(msg.get("type"), str) else None
