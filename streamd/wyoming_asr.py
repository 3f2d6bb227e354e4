"""Wyoming's speech-to-text service, as Home Assistant's voice pipeline calls it: an opt-in TCP
port (10300 by convention).

Home Assistant reaches speech-to-text only through Wyoming: events of one JSON line each, with
optional JSON data and a binary payload after it. This module maps them onto a
:class:`~streamd.hub.Source` like any other, so the captions page shows a voice command as it is
spoken:

- ``describe`` → ``info``: one asr program (streamd, its model, English,
  ``supports_transcript_streaming``);
- ``transcribe`` (its ``language`` checked), ``audio-start``, ``audio-chunk`` (s16 PCM at any
  rate and channel count), ``audio-stop``: one source per transcription;
- hub messages → :class:`TranscriptRenderer`: each final (committed words, never revised) →
  ``transcript-chunk`` after one ``transcript-start``; an error → ``error``;
- at the end, ``transcript`` and ``transcript-stop``. The ``transcript`` is the whole command
  decoded once more, as ``streamd transcribe`` would (commands are short: one window): on the
  20 short dev recordings the live words score 15.9% WER and the whole decode 10.5%, for one
  decode after the stop (BENCHMARKS.md). Where that cannot run (the daemon is stopping, the
  command is over 30 s, the file queue is full, ``wyoming_live_transcript`` is set), it is the chunks
  joined.

The wire format's own reader (:func:`wyoming.event.async_read_event`) takes any line and any
length its header names, so a peer could make the daemon allocate what it likes; events are read
here with explicit limits (:func:`read_event`) and written with the library's encoder.

Wyoming has no authentication, so the daemon's token cannot guard it: the port listens on
loopback unless ``wyoming_host`` says otherwise, and then only the networks in
``wyoming_allow`` may connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.ping import Ping, Pong

from . import __version__
from .audio import SAMPLE_RATE
from .files import QueueFull
from .hub import Outbox, Source, control_message
from .protocol import MAX_CHANNELS, MAX_RATE, MIN_RATE, AudioDecoder, AudioFormat, ProtocolError, in_range
from .sender import StreamTransport

if TYPE_CHECKING:
    from .server import Daemon

__all__ = [
    "PORT",
    "TranscriptRenderer",
    "WyomingAnnouncer",
    "encode",
    "info_event",
    "is_allowed",
    "parse_networks",
    "read_event",
    "serve",
]

log = logging.getLogger(__name__)

PORT = 10300  # the Wyoming convention (wyoming-faster-whisper, Home Assistant's add-ons)
MAX_HEADER_BYTES = 64 * 1024  # one event's JSON line (a few hundred bytes in practice)
MAX_DATA_BYTES = 64 * 1024  # its JSON data (an info event is the largest, about 1 KB)
MAX_REDECODE_S = 30.0  # a command up to one encoder window is decoded once more as a whole
SERVICE_TYPE = "_wyoming._tcp.local."  # what Home Assistant's zeroconf discovery browses for


def encode(event: Event) -> bytes:
    """One event as the wire format, by the library's own writer."""
    out = io.BytesIO()
    write_event(event, out)
    return out.getvalue()


async def read_event(reader: asyncio.StreamReader, max_payload: int) -> Event | None:
    """The next event, ``None`` at a clean end of the connection, or a fatal
    :class:`ProtocolError` for a header that is not an event or lengths past the limits."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as eof:
        if not eof.partial.strip():
            return None
        raise _bad_event("the connection ended inside an event's header") from None
    except asyncio.LimitOverrunError:
        raise _bad_event(f"an event header longer than {MAX_HEADER_BYTES} bytes") from None
    try:
        header = json.loads(line)
    except (ValueError, RecursionError):
        raise _bad_event(f"an event header that is not JSON: {line[:60]!r}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise _bad_event('an event header must be a JSON object with a "type"')
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise _bad_event('an event\'s "data" must be a JSON object')
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", max_payload)
    try:
        if data_length:
            more = json.loads(await reader.readexactly(data_length))
            if not isinstance(more, dict):
                raise _bad_event("an event's data must be a JSON object")
            data.update(more)
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        raise _bad_event("the connection ended inside an event's data or payload") from None
    except (ValueError, RecursionError):
        raise _bad_event("an event's data is not JSON") from None
    return Event(type=header["type"], data=data, payload=payload)


def _length(header: dict, key: str, limit: int) -> int:
    value = header.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad_event(f"{key} must be a byte count, got {value!r}")
    if value > limit:
        code = "frame_too_large" if key == "payload_length" else "bad_event"
        raise ProtocolError(code, f"{key} {value} exceeds the limit of {limit} bytes", fatal=True)
    return value


def _bad_event(message: str) -> ProtocolError:
    return ProtocolError("bad_event", message, fatal=True)


def info_event(model_name: str) -> Event:
    """``info``: streamd as one asr program with its one model."""
    model = AsrModel(
        name=model_name,
        description=f"Whisper {model_name}",
        attribution=Attribution(name="OpenAI", url="https://github.com/openai/whisper"),
        installed=True,
        version=None,
        languages=["en"],
    )
    program = AsrProgram(
        name="streamd",
        description="streamd: live Whisper transcription (committed words streamed as they are spoken)",
        attribution=Attribution(name="streamd", url=""),  # (no public home yet)
        installed=True,
        version=__version__,
        models=[model],
        supports_transcript_streaming=True,
        # Home Assistant ends the command (its own VAD): our VAD only gates what is decoded.
        requires_external_vad=True,
    )
    return Info(asr=[program]).event()


def audio_format(event: Event) -> AudioFormat:
    """The format an ``audio-start`` or ``audio-chunk`` names, or a fatal error."""
    rate, width, channels = (event.data.get(k) for k in ("rate", "width", "channels"))
    for name, value, low, high in (("rate", rate, MIN_RATE, MAX_RATE), ("channels", channels, 1, MAX_CHANNELS)):
        if not in_range(value, low, high):
            raise ProtocolError("unsupported_audio", f"{name} must be an integer from {low} to {high}, got {value!r}",
                                fatal=True)  # fmt: skip
    if width != 2:
        raise ProtocolError("unsupported_audio", f"width must be 2 (16-bit PCM), got {width!r}", fatal=True)
    return AudioFormat("pcm_s16le", rate, channels)


def check_language(event: Event) -> None:
    """A ``transcribe`` asking for a language the model does not speak is refused at once."""
    language = Transcribe.from_event(event).language
    if language is not None and language.split("-")[0].split("_")[0].lower() != "en":
        raise ProtocolError("unsupported_language", f"language {language!r} is not supported: this model "
                            "transcribes English (en)", fatal=True)  # fmt: skip


class TranscriptRenderer:
    """Hub messages (and ``info`` / ``pong`` control messages) of one transcription → Wyoming
    events, in order: committed words as ``transcript-chunk`` s, then ``transcript`` and
    ``transcript-stop`` once the source ends. The chunks joined are the transcript."""

    def __init__(self, info: Event, language: str = "en") -> None:
        self.info = info
        self.language = language
        self.text = ""
        self.hold: Callable[[], bool] = lambda: False  # at the end: keep the transcript for the shell?
        self.held = False  # it did: the shell sends ``closing(...)`` once its whole decode is done
        self._started = False

    def render(self, msg: dict) -> list[bytes]:
        return [encode(e) for e in self._events(msg)]

    def _events(self, msg: dict) -> list[Event]:
        control, kind = msg.get("control"), msg.get("type")
        if control == "info":
            return [self.info]
        if control == "pong":
            return [Pong(text=msg.get("text")).event()]
        if kind == "final" and msg["text"].strip():
            chunk = msg["text"].strip() if not self.text else " " + msg["text"].strip()
            self.text += chunk
            return [*self._start(), TranscriptChunk(text=chunk).event()]
        if kind == "error":
            return [Error(text=msg["message"], code=msg["code"]).event()]
        if kind == "end":
            if self.hold():
                self.held = True
                return self._start()
            return [*self._start(), *self.closing(self.text)]
        return []

    def closing(self, text: str) -> list[Event]:
        return [Transcript(text=text, language=self.language).event(), TranscriptStop().event()]

    def _start(self) -> list[Event]:
        if self._started:
            return []
        self._started = True
        return [TranscriptStart(language=self.language).event()]


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``wyoming_allow``: comma-separated addresses or networks (``192.168.1.5, 10.0.0.0/24``)."""
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())
    except ValueError as e:
        raise ValueError(f"wyoming_allow: {e}") from None


def is_allowed(peer: str, allow: str) -> bool:
    """Loopback always; any other address only when one of ``allow``'s networks holds it."""
    try:
        address = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return False
    if getattr(address, "ipv4_mapped", None):
        address = address.ipv4_mapped
    return address.is_loopback or any(address in net for net in parse_networks(allow))


async def serve(daemon: Daemon, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One Wyoming connection: ``describe`` and ``ping`` answered, each ``audio-start`` ...
    ``audio-stop`` a transcription, until the client closes, goes quiet or breaks the format."""
    c = daemon.config
    peer = (writer.get_extra_info("peername") or ("?",))[0]
    transport = StreamTransport(writer)
    refusal = None
    if not is_allowed(str(peer), c.wyoming_allow):
        log.warning("wyoming: refused %s: not in wyoming_allow", peer)
        refusal = ProtocolError("forbidden", "this address may not use the Wyoming port (wyoming_allow)", True)
    elif len(daemon.wyoming_connections) >= c.max_connections:
        refusal = ProtocolError("too_many_connections", f"the server is at its limit of {c.max_connections} "
                                "Wyoming connections", True)  # fmt: skip
    daemon.wyoming_connections.add(writer)
    try:
        with contextlib.suppress(ConnectionError):
            if refusal is not None:
                return await _refuse(daemon, transport, refusal)
            await _serve_events(daemon, reader, transport)
    finally:
        daemon.wyoming_connections.discard(writer)
        with contextlib.suppress(ConnectionError):
            writer.close()
            await writer.wait_closed()


async def _serve_events(daemon: Daemon, reader: asyncio.StreamReader, transport: StreamTransport) -> None:
    c = daemon.config
    info = info_event(daemon.engine.model_name)
    idle_s = 2 * c.ping_interval_s  # a client silent this long is gone (Wyoming has no keepalive of its own)
    language = "en"
    pending: Event | None = None  # an audio-start that ended the previous transcription

    async def next_event() -> Event | None:
        try:
            return await asyncio.wait_for(read_event(reader, c.max_frame_bytes), idle_s)
        except (TimeoutError, ConnectionError):
            return None

    while not daemon.stopping:
        try:
            event, pending = pending or await next_event(), None
            if event is not None and Transcribe.is_type(event.type):
                check_language(event)
            elif event is not None and (AudioStart.is_type(event.type) or AudioChunk.is_type(event.type)):
                audio_format(event)  # refused before a source opens: nothing to transcribe
        except ProtocolError as err:  # the connection cannot go on: say why, close
            return await _refuse(daemon, transport, err)
        if event is None:
            return
        if Describe.is_type(event.type):
            await transport.send(encode(info))
        elif Ping.is_type(event.type):
            await transport.send(encode(Pong(text=Ping.from_event(event).text).event()))
        elif Transcribe.is_type(event.type):
            language = Transcribe.from_event(event).language or "en"
        elif AudioStop.is_type(event.type):  # a stop with no audio before it: nothing was said
            await transport.send(encode(Transcript(text="", language=language).event()))
        elif AudioStart.is_type(event.type) or AudioChunk.is_type(event.type):
            session = _Transcription(daemon, event, next_event)
            renderer = TranscriptRenderer(info, language)
            renderer.hold = lambda s=session, r=renderer: (
                not c.wyoming_live_transcript and not daemon.stopping and s.audio is not None and bool(r.text)
            )
            fatal = await daemon.serve_live("wyoming", None, transport, renderer.render, session.read)
            if renderer.held:
                text = await _whole_text(daemon, session, renderer.text)
                await transport.send(b"".join(encode(e) for e in renderer.closing(text)))
            if fatal is not None:
                return
            pending = session.next
        # Any other event (another program's, or a newer one) is dropped, as the protocol asks.


async def _whole_text(daemon: Daemon, session: _Transcription, live: str) -> str:
    """The whole command decoded once more (the file path: VAD spans, one window, greedy), or
    the live words where that fails."""
    from whisper_engine.transcribe import TranscribeOptions

    assert session.audio is not None
    daemon.wyoming_busy.add(asyncio.current_task())
    try:
        audio = np.concatenate(session.audio)
        whole = await daemon.files.transcribe(audio, TranscribeOptions(word_timestamps=False))
        return whole.text.strip() or live
    except QueueFull:  # the file API is busy: the live words are the transcript
        log.info("wyoming: the file queue is full; sending the live words")
        return live
    except Exception:  # the engine failed: the live words are the transcript
        log.warning("wyoming: the whole-command decode failed; sending the live words", exc_info=True)
        return live
    finally:
        daemon.wyoming_busy.discard(asyncio.current_task())


async def _refuse(daemon: Daemon, transport: StreamTransport, err: ProtocolError) -> None:
    """An ``error`` event (counted in ``/metrics``) before the connection closes."""
    daemon.metrics.errors.labels(err.code).inc()
    with contextlib.suppress(ConnectionError):
        await transport.send(encode(Error(text=str(err), code=err.code).event()))


class _Transcription:
    """The ingest of one transcription: audio chunks fed to its source until ``audio-stop``."""

    def __init__(self, daemon: Daemon, first: Event, next_event) -> None:
        self.daemon, self.first, self.next_event = daemon, first, next_event
        self.next: Event | None = None  # an ``audio-start`` that begins the next transcription
        self.audio: list[np.ndarray] | None = []  # the command, 16 kHz mono, for the whole decode
        self._kept = 0

    async def feed(self, source: Source, samples: np.ndarray) -> None:
        """Into the stream, and kept for the whole decode (up to ``MAX_REDECODE_S``)."""
        if self.audio is not None:
            self._kept += len(samples)
            if self._kept <= MAX_REDECODE_S * SAMPLE_RATE:
                self.audio.append(samples)
            else:
                self.audio = None  # a long dictation, not a command: its live words are the text
        await self.daemon.feed(source, samples)

    async def read(self, source: Source, outbox: Outbox) -> ProtocolError | None:
        daemon = self.daemon
        decoder: AudioDecoder | None = None
        event: Event | None = self.first
        try:
            while event is not None:
                if AudioStart.is_type(event.type) or AudioChunk.is_type(event.type):
                    fmt = audio_format(event)
                    if decoder is None or decoder.format != fmt:
                        if decoder is not None:
                            await self.feed(source, decoder.flush())
                        decoder = AudioDecoder(fmt, daemon.config.max_frame_bytes, carry=True)
                    if AudioChunk.is_type(event.type) and event.payload:
                        samples, _ = decoder.decode(event.payload)
                        await self.feed(source, samples)
                elif AudioStop.is_type(event.type):
                    break
                elif Describe.is_type(event.type):
                    outbox.put(control_message("info"))
                elif Ping.is_type(event.type):
                    outbox.put(control_message("pong", text=Ping.from_event(event).text))
                event = await self.next_event()
                if event is not None and AudioStart.is_type(event.type) and decoder is not None:
                    self.next = event  # a new transcription without a stop: this one ends here
                    break
        except ProtocolError as fatal:
            daemon.metrics.errors.labels(fatal.code).inc()
            source.error(fatal)
            return fatal
        if decoder is not None:
            await self.feed(source, decoder.flush())
        return None


class WyomingAnnouncer:
    """Home Assistant's discovery: the Wyoming port announced over mDNS (zeroconf) while the
    daemon runs, withdrawn at shutdown so that no stale service lingers."""

    def __init__(self, port: int, host: str, name: str | None = None) -> None:
        self.port, self.host = port, host
        self.name = name or f"streamd-{socket.gethostname()}"
        self._zc = None
        self._info = None

    async def start(self) -> None:
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        address = self.host if self.host not in ("", "0.0.0.0", "::") else _outward_address()
        self._info = AsyncServiceInfo(SERVICE_TYPE, f"{self.name}.{SERVICE_TYPE}", port=self.port,
                                      parsed_addresses=[address], properties={"version": __version__})  # fmt: skip
        self._zc = AsyncZeroconf()
        await self._zc.async_register_service(self._info)
        log.info("wyoming: announced as %r on %s:%d (zeroconf)", self.name, address, self.port)

    async def stop(self) -> None:
        if self._zc is not None:
            with contextlib.suppress(Exception):  # the network may be gone at shutdown
                await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()
            self._zc = None


def _outward_address() -> str:
    """The address other hosts reach this one by: the source address of a route to the mDNS
    group (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("224.0.0.251", 5353))
        return s.getsockname()[0]
