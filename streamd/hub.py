"""Named sources and the clients that receive their messages.

A :class:`Source` is one live audio stream (a websocket client, a TCP connection, the
microphone, a file) with its :class:`~streamd.stream.Stream`; it numbers its messages and fans
them out. Every receiving client has an :class:`Outbox`: publishing never waits on a client, a
slow client loses partials (each newer partial replaces the older), never finals, and is cut
off once too many messages wait for it. The :class:`Hub` names sources so that viewers can
subscribe to one by id, before it starts and across its sessions.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from whisper_engine.mel import StreamingMel

from .protocol import POLICY_VIOLATION, PROTOCOL_VERSION, TRY_AGAIN_LATER, ProtocolError, event_message
from .store import TranscriptStore
from .stream import Event, Final, Partial, Stream, StreamConfig

__all__ = ["Hub", "Message", "Outbox", "Source", "control_message"]

DROPPABLE = ("partial", "vad")
VIEWER_HISTORY_S = 4 * 3600.0  # a viewer gets the earlier sessions of this long (a meeting); downloads get all


@dataclass(frozen=True)
class Message:
    type: str
    text: str  # serialised once, shared by every receiver


def control_message(control: str, **data: object) -> Message:
    """An adapter's own message to its client (a reply, a commit done), queued in order with the
    hub's messages and rendered by the adapter's renderer; never dropped for being late."""
    return Message("control", json.dumps({"control": control, **data}))


class Outbox:
    """One client's queue of outgoing messages, bounded at ``limit``.

    Over the limit, queued partials and VAD notices are dropped first; when finals alone
    exceed it the client cannot keep up, and :attr:`overflowed` is set (the connection then
    gets one ``slow_client`` error and is closed).
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._queue: deque[Message] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._backlog = 0  # history queued ahead of live messages, not counted against the limit
        self.overflowed = False
        self.dropped = 0
        self.on_overflow: Callable[[], object] | None = None  # e.g. interrupt a send blocked on the socket

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, message: Message) -> None:
        if self._closed or self.overflowed:
            return
        if message.type == "partial" and any(m.type == "partial" for m in self._queue):
            kept = deque(m for m in self._queue if m.type != "partial")
            self.dropped += len(self._queue) - len(kept)
            self._queue = kept
        self._queue.append(message)
        if len(self._queue) - self._backlog > self.limit:
            kept = deque(m for m in self._queue if m.type not in DROPPABLE)
            self.dropped += len(self._queue) - len(kept)
            self._queue = kept
            if len(self._queue) - self._backlog > self.limit:
                self.overflowed = True
                self._queue.clear()
                if self.on_overflow is not None:
                    self.on_overflow()
        self._wakeup.set()

    def put_backlog(self, messages: list[Message]) -> None:
        """Messages from before this client came (a viewer's history, the finals a resuming
        client missed): queued ahead of live ones and not counted against the limit, which
        bounds what a client falls behind on, not the length of a meeting."""
        if self._closed or self.overflowed or not messages:
            return
        self._queue.extend(messages)
        self._backlog += len(messages)
        self._wakeup.set()

    def close(self) -> None:
        """No more messages: :meth:`get` returns ``None`` once the queue is drained."""
        self._closed = True
        self._wakeup.set()

    async def get(self) -> Message | None:
        """The next message; ``None`` when closed and drained, or overflowed."""
        while True:
            if self.overflowed:
                return None
            if self._queue:
                self._backlog = max(0, self._backlog - 1)
                return self._queue.popleft()
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()


class Source:
    """One session of a named audio source: its stream, its numbered messages, its receivers."""

    def __init__(
        self,
        source_id: str,
        kind: str,
        ready: dict,
        viewers: set[Outbox],
        config: StreamConfig | None = None,
        history: int = 500,
        on_final: Callable[[float], None] | None = None,
    ) -> None:
        self.id = source_id
        self.kind = kind
        self.session = uuid.uuid4().hex[:12]
        self.stream = Stream(config)
        self.mel = StreamingMel()  # the stream's mel, computed as audio arrives (pipeline's first stage)
        self.mel_sent = 0  # stream samples handed to ``mel`` so far
        self.started = time.time()  # wall clock: shown to people, and the store's session order
        self._opened = time.monotonic()  # latencies and urgency: a clock that never steps
        self.seq = 0
        self.owner: Outbox | None = None  # the client that sends the audio, if any
        self.detached = False  # its client dropped: it waits for a resume, or is being finalised
        self._viewers = viewers  # the hub's set for this id: viewers may come and go
        self._history: deque[Message] = deque(maxlen=history)
        self._ready = {"type": "ready", "seq": 0, "protocol": PROTOCOL_VERSION, "session": self.session,
                       "source": source_id, **ready}  # fmt: skip
        self._progress = asyncio.Event()
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=4096)  # (stream time, monotonic clock)
        self._on_final = on_final
        self.store: TranscriptStore | None = None  # where its finals are kept across restarts
        self.finished = False
        self.ended = False
        self.finals = 0

    @property
    def ready_message(self) -> Message:
        return Message("ready", json.dumps(self._ready))

    @property
    def ready_message_resumed(self) -> Message:
        """The ready message of a resumed session: the same session, and the last ``seq`` sent."""
        return Message("ready", json.dumps({**self._ready, "resumed": True, "last_seq": self.seq}))

    def finals_after(self, seq: int) -> list[Message]:
        """The finals numbered after ``seq`` (of the last :attr:`history` kept)."""
        return [m for m in self._history if json.loads(m.text)["seq"] > seq]

    def replay(self, outbox: Outbox) -> None:
        """A viewer joining now: the ready message and the finals so far."""
        outbox.put_backlog([self.ready_message, *self._history])

    def publish(self, message: dict, viewers: bool = True) -> None:
        """Number ``message`` and queue it for the owner and (unless ``viewers`` is false) the viewers."""
        self.seq += 1
        msg = Message(message["type"], json.dumps({"type": message["type"], "seq": self.seq, **message}))
        if msg.type == "final":
            self._history.append(msg)
            if self.store is not None:
                self.store.add_final(self.session, self.seq, msg.text)
        if self.owner is not None:
            self.owner.put(msg)
        if viewers:
            for outbox in self._viewers:
                outbox.put(msg)

    def error(self, error: ProtocolError) -> None:
        """Tell the owner about its own mistake (viewers do not need to know)."""
        self.publish(error.message(), viewers=False)

    def emit(self, events: list[Event]) -> None:
        now = time.monotonic()
        for event in events:
            if isinstance(event, Final):
                self.finals += 1
                if self._on_final is not None:
                    self._on_final(now - self.arrival(event.end))
            elif isinstance(event, Partial) and not event.text:
                continue
            self.publish(event_message(event))

    def arrival(self, t: float) -> float:
        """When stream time ``t`` was received, on the monotonic clock (an NTP step of the wall
        clock must not make a final look late, or a stream look urgent)."""
        for stream_t, at in reversed(self._arrivals):
            if stream_t <= t:
                return at
        return self._arrivals[0][1] if self._arrivals else self._opened

    @property
    def waited(self) -> float:
        """Seconds this source's next decode has waited, the scheduler's order: since its speech
        ended when a final is due, else :attr:`lag` (the audio not yet decoded grows no older
        once a client stops, so a due final is timed from the end of its speech)."""
        end = self.stream.speech_end
        if end is not None:
            return max(0.0, time.monotonic() - self.arrival(end))
        return self.lag

    @property
    def lag(self) -> float:
        """Seconds between now and the arrival of the audio the last decode ended at."""
        covered = self.stream.time - self.stream.lag
        return max(0.0, time.monotonic() - self.arrival(covered)) if self.stream.lag > 0 else 0.0

    def feed(self, samples: np.ndarray) -> None:
        if len(samples):
            self.emit(self.stream.feed(samples))
            self._arrivals.append((self.stream.time, time.monotonic()))

    def progressed(self) -> None:
        """A decode of this source finished (the scheduler calls this)."""
        self._progress.set()

    async def wait_progress(self) -> None:
        """Until the next :meth:`progressed` (or at once if one came since the last wait);
        callers re-check their condition after it."""
        await self._progress.wait()
        self._progress.clear()

    def finish(self) -> None:
        """No more audio: what is left is the end of speech."""
        if not self.finished:
            self.finished = True
            self.emit(self.stream.finish())


class Hub:
    """Live sources by id, and the viewers of each id (which outlive sessions)."""

    def __init__(
        self,
        ready: dict | Callable[[], dict],
        config: StreamConfig | None = None,
        max_streams: int = 16,
        store: TranscriptStore | None = None,
    ) -> None:
        self._ready = ready  # or a function: the devices can change (an accelerator stage falls back)
        self.config = config
        self.max_streams = max_streams
        self.store = store
        self.sources: dict[str, Source] = {}
        self._viewers: dict[str, set[Outbox]] = {}
        self._counter = 0
        self.on_final: Callable[[float], None] | None = None

    def new_id(self, kind: str) -> str:
        self._counter += 1
        return f"{kind}-{self._counter}"

    def open(self, source_id: str | None, kind: str) -> Source:
        """A new session; refused while a source of that id is live or live streams are at the
        limit (detached sessions do not count: the server finalises the oldest to make room)."""
        source_id = source_id or self.new_id(kind)
        if source_id in self.sources:
            raise ProtocolError(
                "source_in_use", f"source {source_id!r} is already streaming", fatal=True, close_code=POLICY_VIOLATION
            )
        if self.live_count >= self.max_streams:
            raise ProtocolError(
                "too_many_streams",
                f"the server is at its limit of {self.max_streams} streams",
                fatal=True,
                close_code=TRY_AGAIN_LATER,
            )
        viewers = self._viewers.setdefault(source_id, set())
        ready = self._ready() if callable(self._ready) else self._ready
        source = Source(source_id, kind, ready, viewers, self.config, on_final=self.on_final)
        if self.store is not None:
            source.store = self.store
            self.store.add_session(source_id, source.session, source.started, source.ready_message.text)
        self.sources[source_id] = source
        for outbox in viewers:
            outbox.put(source.ready_message)
        return source

    @property
    def live_count(self) -> int:
        """Sources with a client (or a file, a mic, a TCP peer) feeding them: not detached ones."""
        return sum(1 for s in self.sources.values() if not s.detached)

    def close(self, source: Source) -> None:
        """The session is over: ``end`` goes to everyone, and the id is free again."""
        if not source.ended:
            source.ended = True
            source.publish({"type": "end"})
            if self.store is not None:
                self.store.end_session(source.session)
        if self.sources.get(source.id) is source:
            del self.sources[source.id]

    def watch(self, source_id: str, outbox: Outbox) -> None:
        """A viewer of ``source_id``: the source's recent earlier sessions (from the store, each
        as its ready, finals and end), then the live session's ready and finals so far."""
        self._viewers.setdefault(source_id, set()).add(outbox)
        live = self.sources.get(source_id)
        if self.store is not None:
            for stored in self.store.sessions(source_id, since=time.time() - VIEWER_HISTORY_S):
                if live is not None and stored.session == live.session:
                    continue
                end = Message("end", json.dumps({"type": "end", "seq": stored.last_seq + 1}))
                outbox.put_backlog([Message("ready", stored.ready), *(Message("final", m) for m in stored.finals), end])
        if live is not None:
            live.replay(outbox)

    def unwatch(self, source_id: str, outbox: Outbox) -> None:
        viewers = self._viewers.get(source_id)
        if viewers is not None:
            viewers.discard(outbox)
            if not viewers and source_id not in self.sources:
                del self._viewers[source_id]

    def outboxes(self) -> list[Outbox]:
        """Every client's outbox: owners of live sources and viewers."""
        owners = [s.owner for s in self.sources.values() if s.owner is not None]
        return owners + [o for v in self._viewers.values() for o in v]

    @property
    def viewer_count(self) -> int:
        return sum(len(v) for v in self._viewers.values())
