"""OpenAI's Realtime API in transcription mode: ``ws /v1/realtime?intent=transcription``.

Apps and agent frameworks built on it (the ``openai`` SDK's ``client.realtime.connect``, Pipecat,
LiveKit's OpenAI plugin) get live captions from streamd with the base URL changed. A session is
the same :class:`~streamd.hub.Source` as a protocol v1 stream (VAD, windows, commit policy, the
viewers of ``/v1/captions``); this module only maps the wire format onto it:

- client events → :class:`RealtimeClient` (sans-I/O): settings, audio, commits and clears;
- hub messages → server events, :class:`RealtimeRenderer` (sans-I/O): ``vad`` →
  ``input_audio_buffer.speech_started`` / ``speech_stopped`` and ``committed``; ``final`` →
  ``conversation.item.input_audio_transcription.delta`` (append-only: only committed words,
  never revised); ``utterance_end`` → ``...transcription.completed`` with the item's text.

Event names are the current API's (``session.created``, ``session.update`` with ``type:
"transcription"``, ``conversation.item.added``); a client that sends ``OpenAI-Beta: realtime=v1``
(or offers the ``openai-beta.realtime-v1`` subprotocol) gets the beta names
(``transcription_session.created`` / ``.updated``, ``conversation.item.created``), and either
kind of update is understood from either kind of client.

With ``turn_detection`` ``server_vad`` (the default) an item is one utterance of our VAD, whose
own thresholds hold (the session echoes what the client set). With ``turn_detection: null``
the client's ``commit`` ends an item, which then holds everything said since the last one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from .hub import Outbox, Source, control_message
from .protocol import MAX_RATE, MIN_RATE, SOURCE_ID, AudioDecoder, AudioFormat, ProtocolError, bad_source, in_range
from .sender import WebsocketTransport

if TYPE_CHECKING:
    from .server import Daemon

__all__ = [
    "PATH",
    "RealtimeClient",
    "RealtimeError",
    "RealtimeRenderer",
    "RealtimeSettings",
    "is_beta",
    "refusal",
    "serve",
]

PATH = "/v1/realtime"
DEFAULT_RATE = 24000  # what OpenAI's audio/pcm is
#: Formats, as the current API names them and as the beta did, with their encodings.
FORMATS = {"audio/pcm": "pcm_s16le", "audio/pcmu": "mulaw", "audio/pcma": "alaw"}
BETA_FORMATS = {"pcm16": ("audio/pcm", DEFAULT_RATE), "g711_ulaw": ("audio/pcmu", 8000),
                "g711_alaw": ("audio/pcma", 8000)}  # fmt: skip
SERVER_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
MIN_COMMIT_MS = 100  # OpenAI refuses to commit less audio than this
LANGUAGES = ("en",)  # what the English-only model takes (protocol v1's start takes the same)


class RealtimeError(Exception):
    """A client event this session cannot take; the session goes on (as OpenAI's does)."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None,
                 event_id: str | None = None, kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.code, self.param, self.event_id, self.kind = code, param, event_id, kind

    def event(self) -> dict:
        error = {"type": self.kind, "code": self.code, "message": str(self), "param": self.param,
                 "event_id": self.event_id}  # fmt: skip
        return {"type": "error", "error": error}


@dataclass(frozen=True)
class RealtimeSettings:
    """The session as the client configured it."""

    model: str
    format: str = "audio/pcm"
    rate: int = DEFAULT_RATE
    language: str | None = "en"
    prompt: str = ""
    turn_detection: dict | None = field(default_factory=lambda: dict(SERVER_VAD))
    noise_reduction: dict | None = None
    include: tuple[str, ...] = ()

    @property
    def audio(self) -> AudioFormat:
        return AudioFormat(FORMATS[self.format], self.rate, 1)

    @property
    def server_vad(self) -> bool:
        return self.turn_detection is not None

    def session(self, session_id: str, beta: bool) -> dict:
        """The session object of ``session.created`` / ``.updated`` (or the beta's)."""
        transcription = {"model": self.model, "language": self.language, "prompt": self.prompt}
        if beta:
            beta_format = next(k for k, (name, _) in BETA_FORMATS.items() if name == self.format)
            return {"id": session_id, "object": "realtime.transcription_session", "input_audio_format": beta_format,
                    "input_audio_transcription": transcription, "turn_detection": self.turn_detection,
                    "input_audio_noise_reduction": self.noise_reduction, "include": list(self.include),
                    "modalities": ["text"]}  # fmt: skip
        audio_input = {"format": {"type": self.format, "rate": self.rate}, "transcription": transcription,
                       "turn_detection": self.turn_detection, "noise_reduction": self.noise_reduction}  # fmt: skip
        return {"type": "transcription", "id": session_id, "object": "realtime.transcription_session",
                "audio": {"input": audio_input}, "include": list(self.include)}  # fmt: skip

    def updated(self, session: object, languages: tuple[str, ...], event_id: str | None) -> RealtimeSettings:
        """These settings with a ``session.update``'s (current shape) or a
        ``transcription_session.update``'s (beta shape) applied; a bad field raises."""

        def bad(message: str, param: str) -> RealtimeError:
            return RealtimeError(message, "invalid_value", param, event_id)

        if not isinstance(session, dict):
            raise bad("session must be an object", "session")
        kind = session.get("type", "transcription")
        if kind != "transcription":
            raise bad(f"this server transcribes only: session.type must be 'transcription', got {kind!r}",
                      "session.type")  # fmt: skip
        s = self
        audio = session.get("audio")
        if audio is not None:  # the current API's shape
            audio_input = audio.get("input", {}) if isinstance(audio, dict) else None
            if not isinstance(audio_input, dict):
                raise bad("session.audio.input must be an object", "session.audio.input")
            s = s._with_format(audio_input.get("format"), "session.audio.input.format", bad)
            s = s._with_transcription(audio_input, "transcription", "session.audio.input.transcription", bad)
            s = s._with_turns(audio_input, "session.audio.input.turn_detection", bad)
            if "noise_reduction" in audio_input:
                s = replace(s, noise_reduction=audio_input["noise_reduction"])
        if "input_audio_format" in session:  # the beta's shape
            name = session["input_audio_format"]
            if name not in BETA_FORMATS:
                raise bad(f"input_audio_format must be one of {', '.join(BETA_FORMATS)}, got {name!r}",
                          "session.input_audio_format")  # fmt: skip
            s = replace(s, format=BETA_FORMATS[name][0], rate=BETA_FORMATS[name][1])
        s = s._with_transcription(session, "input_audio_transcription", "session.input_audio_transcription", bad)
        s = s._with_turns(session, "session.turn_detection", bad)
        if "input_audio_noise_reduction" in session:
            s = replace(s, noise_reduction=session["input_audio_noise_reduction"])
        include = session.get("include")
        if include is not None:
            if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
                raise bad("include must be a list of strings", "session.include")
            s = replace(s, include=tuple(include))
        if s.language not in (None, *languages):
            raise bad(f"language {s.language!r} is not supported by this model (supported: {', '.join(languages)})",
                      "session.audio.input.transcription.language")  # fmt: skip
        return s

    def _with_format(self, fmt: object, param: str, bad) -> RealtimeSettings:
        if fmt is None:
            return self
        if not isinstance(fmt, dict) or fmt.get("type") not in FORMATS:
            raise bad(f"format.type must be one of {', '.join(FORMATS)}", param)
        rate = fmt.get("rate", DEFAULT_RATE if fmt["type"] == "audio/pcm" else 8000)
        if not in_range(rate, MIN_RATE, MAX_RATE):
            raise bad(f"format.rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz, got {rate!r}", param)
        return replace(self, format=fmt["type"], rate=rate)

    def _with_transcription(self, parent: dict, key: str, param: str, bad) -> RealtimeSettings:
        if key not in parent or parent[key] is None:
            return self
        t = parent[key]
        if not isinstance(t, dict):
            raise bad(f"{key} must be an object", param)
        s = self
        for name in ("model", "prompt"):
            if name in t:
                if not isinstance(t[name], str):
                    raise bad(f"{name} must be a string", f"{param}.{name}")
                s = replace(s, **{name: t[name]})
        if "language" in t:
            if t["language"] is not None and not isinstance(t["language"], str):
                raise bad("language must be a string", f"{param}.language")
            s = replace(s, language=t["language"])
        return s

    def _with_turns(self, parent: dict, param: str, bad) -> RealtimeSettings:
        if "turn_detection" not in parent:
            return self
        turns = parent["turn_detection"]
        if turns is None:
            return replace(self, turn_detection=None)
        if not isinstance(turns, dict) or turns.get("type", "server_vad") not in ("server_vad", "semantic_vad"):
            raise bad('turn_detection must be null or {"type": "server_vad", ...}', param)
        return replace(self, turn_detection={**SERVER_VAD, **turns})


def is_beta(beta_headers: list[str], subprotocols: list[str]) -> bool:
    """Does the client speak the beta API (its ``OpenAI-Beta`` header, or the subprotocol that
    browsers offer instead)?"""
    return any("realtime=v1" in h for h in beta_headers) or "openai-beta.realtime-v1" in subprotocols


# --- the client's side: events in ------------------------------------------------------------


@dataclass
class Audio:
    pcm: bytes


@dataclass
class Reply:
    event: dict


@dataclass
class Commit:
    event_id: str | None


@dataclass
class Clear:
    pass


@dataclass
class Reformat:
    audio: AudioFormat


Action = Audio | Reply | Commit | Clear | Reformat


class RealtimeClient:
    """What the client's events ask for, without I/O: ``handle(text)`` returns the actions."""

    def __init__(self, settings: RealtimeSettings, beta: bool, languages: tuple[str, ...] = ("en",),
                 max_append_bytes: int = 1 << 20) -> None:  # fmt: skip
        self.settings = settings
        self.beta = beta
        self.languages = languages
        self.max_append_bytes = max_append_bytes
        self.session_id = "sess_" + uuid.uuid4().hex[:24]
        self.appended_ms = 0.0  # audio appended since the last commit or clear

    def created(self) -> dict:
        name = "transcription_session.created" if self.beta else "session.created"
        return {"type": name, "session": self.settings.session(self.session_id, self.beta)}

    def handle(self, text: str | bytes) -> list[Action]:
        try:
            return self._handle(text)
        except RealtimeError as err:
            return [Reply(err.event())]

    def _handle(self, text: str | bytes) -> list[Action]:
        if isinstance(text, bytes):
            raise RealtimeError("binary frames are not events: send audio as input_audio_buffer.append "
                                "with base64 audio", "invalid_event")  # fmt: skip
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            raise RealtimeError("the event is not JSON", "invalid_json") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise RealtimeError("an event must be an object with a string 'type'", "invalid_event", "type")
        kind, event_id = event["type"], event.get("event_id")
        event_id = event_id if isinstance(event_id, str) else None
        if kind == "input_audio_buffer.append":
            return self._append(event.get("audio"), event_id)
        if kind in ("session.update", "transcription_session.update"):
            before = self.settings
            self.settings = self.settings.updated(event.get("session"), self.languages, event_id)
            name = "transcription_session.updated" if self.beta else "session.updated"
            actions: list[Action] = []
            if self.settings.audio != before.audio:
                actions.append(Reformat(self.settings.audio))
            return [*actions, Reply({"type": name, "session": self.settings.session(self.session_id, self.beta)})]
        if kind == "input_audio_buffer.commit":
            if self.appended_ms < MIN_COMMIT_MS:
                raise RealtimeError(
                    f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, but the buffer holds "
                    f"{self.appended_ms:.2f} ms", "input_audio_buffer_commit_empty", None, event_id,
                )  # fmt: skip
            self.appended_ms = 0.0
            return [Commit(event_id)]
        if kind == "input_audio_buffer.clear":
            self.appended_ms = 0.0
            return [Clear(), Reply({"type": "input_audio_buffer.cleared"})]
        raise RealtimeError(
            f"unsupported event {kind!r} in a transcription session: use session.update, "
            "input_audio_buffer.append, .commit or .clear", "invalid_value", "type", event_id,
        )  # fmt: skip

    def _append(self, audio: object, event_id: str | None) -> list[Action]:
        if not isinstance(audio, str):
            raise RealtimeError("audio must be a base64 string", "invalid_value", "audio", event_id)
        if len(audio) > self.max_append_bytes * 4 // 3 + 4:
            raise RealtimeError(f"an append of more than {self.max_append_bytes} bytes of audio: send less at "
                                "a time", "invalid_value", "audio", event_id)  # fmt: skip
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError("audio is not valid base64", "invalid_value", "audio", event_id) from None
        fmt = self.settings.audio
        self.appended_ms += 1000 * len(pcm) / fmt.frame_bytes / fmt.sample_rate
        return [Audio(pcm)]


# --- the server's side: events out -------------------------------------------------------------


@dataclass
class _Item:
    id: str
    text: str = ""
    start_ms: int | None = None
    end_ms: int | None = None


class RealtimeRenderer:
    """Hub messages (and this module's control messages) → Realtime server events, in order.

    Items: with server VAD, each utterance is one (opened at ``speech_started``, completed at its
    ``utterance_end``; its finals are its deltas, the oldest open item's since utterances end in
    order); without, one item gathers every final until the client's commit is done."""

    def __init__(self, created: dict, beta: bool) -> None:
        self.created = created
        self.beta = beta
        self.server_vad = _server_vad(created["session"])
        self._ids = itertools.count(1)
        self._open: deque[_Item] = deque()  # server VAD: utterances not yet completed
        self._current: _Item | None = None  # no server VAD: the item the next commit ends
        self._previous: str | None = None  # the last committed item, for previous_item_id

    def render(self, msg: dict) -> list[str]:
        return [json.dumps({"event_id": f"event_{next(self._ids)}", **e}) for e in self._events(msg)]

    def _events(self, msg: dict) -> list[dict]:
        control = msg.get("control")
        if control == "reply":
            event = msg["event"]
            if event["type"] in ("session.updated", "transcription_session.updated"):
                self.server_vad = _server_vad(event["session"])
            return [event]
        if control == "commit":
            return self._committed(self._item())
        if control == "commit_done":
            return self._complete_current()
        if control == "clear":
            # What was not transcribed is gone: items already committed complete with the text
            # they have, the rest are dropped.
            done = [self._completed(i) for i in self._open if i.end_ms is not None]
            self._open.clear()
            self._current = None
            return done
        kind = msg.get("type")
        if kind == "ready":
            return [self.created]
        if kind == "error":
            return [_error_event(msg)]
        if kind == "final":
            item = (self._open[0] if self._open else self._opened(None)) if self.server_vad else self._item()
            delta = msg["text"] if not item.text else " " + msg["text"]
            item.text += delta
            return [{"type": "conversation.item.input_audio_transcription.delta", "item_id": item.id,
                     "content_index": 0, "delta": delta}]  # fmt: skip
        if not self.server_vad:
            return []  # the client's commits end items; speech events are for server VAD
        if kind == "vad" and msg["speech"]:
            item = self._opened(round(msg["t"] * 1000))
            return [{"type": "input_audio_buffer.speech_started", "audio_start_ms": item.start_ms,
                     "item_id": item.id}]  # fmt: skip
        if kind == "vad":
            item = next((i for i in reversed(self._open) if i.end_ms is None), None)
            if item is None:
                return []
            item.end_ms = round(msg["t"] * 1000)
            stopped = {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": item.end_ms, "item_id": item.id}
            return [stopped, *self._committed(item)]
        if kind == "utterance_end" and self._open:
            return [self._completed(self._open.popleft())]
        return []

    def _opened(self, start_ms: int | None) -> _Item:
        item = _Item("item_" + uuid.uuid4().hex[:20], start_ms=start_ms)
        self._open.append(item)
        return item

    def _item(self) -> _Item:
        if self._current is None:
            self._current = _Item("item_" + uuid.uuid4().hex[:20])
        return self._current

    def _committed(self, item: _Item) -> list[dict]:
        previous, self._previous = self._previous, item.id
        content = [{"type": "input_audio", "transcript": None}]
        added = {"type": "conversation.item.created" if self.beta else "conversation.item.added",
                 "previous_item_id": previous,
                 "item": {"id": item.id, "object": "realtime.item", "type": "message", "status": "completed",
                          "role": "user", "content": content}}  # fmt: skip
        return [{"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item.id}, added]

    def _complete_current(self) -> list[dict]:
        if self._current is None:
            return []
        item, self._current = self._current, None
        return [self._completed(item)]

    def _completed(self, item: _Item) -> dict:
        seconds = max(0.0, ((item.end_ms or 0) - (item.start_ms or 0)) / 1000)
        return {"type": "conversation.item.input_audio_transcription.completed", "item_id": item.id,
                "content_index": 0, "transcript": item.text,
                "usage": {"type": "duration", "seconds": seconds}}  # fmt: skip


def _server_vad(session: dict) -> bool:
    turns = session.get("audio", {}).get("input", {}).get("turn_detection") if "audio" in session else (
        session.get("turn_detection"))  # fmt: skip
    return turns is not None


def _error_event(msg: dict) -> dict:
    """A protocol v1 error (a refused stream, an engine error, a slow client) in Realtime's shape."""
    server = msg["code"] in ("engine_error", "internal_error")
    kind = "server_error" if server else "invalid_request_error"
    return RealtimeError(msg["message"], msg["code"], kind=kind).event()


def refusal(path: str, query: str) -> tuple[HTTPStatus, str] | None:
    """The handshake's answer to a query this endpoint cannot take (a bad ``source``), or ``None``."""
    if path != PATH:
        return None
    source = parse_qs(query).get("source", [None])[0]
    if source is not None and not SOURCE_ID.match(source):
        message = bad_source(source)
        return HTTPStatus.BAD_REQUEST, json.dumps(RealtimeError(message, param="source").event())
    return None


# --- the shell --------------------------------------------------------------------------------


async def serve(daemon: Daemon, ws: ServerConnection) -> None:
    """One Realtime connection: a live source until the client goes or the daemon stops."""
    url = urlsplit(ws.request.path)
    query = parse_qs(url.query)
    source_id = query.get("source", [None])[0]  # (the handshake refused a bad one)
    offered = [p.strip() for v in ws.request.headers.get_all("Sec-WebSocket-Protocol") for p in v.split(",")]
    beta = is_beta(ws.request.headers.get_all("OpenAI-Beta"), offered)
    settings = RealtimeSettings(model=query.get("model", [daemon.engine.model_name])[0])
    client = RealtimeClient(settings, beta, LANGUAGES, daemon.config.max_frame_bytes)
    renderer = RealtimeRenderer(client.created(), beta)

    async def read(source: Source, outbox: Outbox) -> None:
        decoder = AudioDecoder(client.settings.audio, carry=True)
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                for action in client.handle(frame):
                    if isinstance(action, Audio):
                        samples, _ = decoder.decode(action.pcm)
                        await daemon.feed(source, samples)
                    elif isinstance(action, Reply):
                        if action.event["type"] == "error":
                            daemon.metrics.errors.labels(action.event["error"]["code"]).inc()
                        outbox.put(control_message("reply", event=action.event))
                    elif isinstance(action, Reformat):
                        await daemon.feed(source, decoder.flush())
                        decoder = AudioDecoder(action.audio, carry=True)
                    elif isinstance(action, Commit):
                        # Without server VAD the commit ends the item; with it, the speech open
                        # now ends (its events then commit the item), or an empty item is made.
                        await daemon.feed(source, decoder.flush())
                        decoder = AudioDecoder(client.settings.audio, carry=True)
                        manual = not renderer.server_vad
                        if manual:
                            outbox.put(control_message("commit"))
                        if not await daemon.cut(source) and not manual:
                            outbox.put(control_message("commit"))
                            manual = True
                        if manual:
                            outbox.put(control_message("commit_done"))
                    elif isinstance(action, Clear):
                        daemon.clear(source)
                        decoder = AudioDecoder(client.settings.audio, carry=True)
                        outbox.put(control_message("clear"))
            await daemon.feed(source, decoder.flush())

    transport = WebsocketTransport(ws, daemon.config.slow_client_grace_s)
    fatal = await daemon.serve_live("realtime", source_id, transport, renderer.render, read)
    code = CloseCode.GOING_AWAY if daemon.stopping else CloseCode.NORMAL_CLOSURE
    if isinstance(fatal, ProtocolError):
        code = fatal.close_code
    await ws.close(code)
