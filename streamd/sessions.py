"""Detached sessions: a websocket client that drops without ``stop`` leaves its session waiting
``resume_s`` seconds for it to come back (the resume extension of protocol v1).

They have their own bound, ``max_detached``, and never take live capacity: when a new stream
needs a slot (live and detached sessions together past ``max_streams``), or past the bound, the
oldest detached session is finalised first; its finals reached its viewers when its client
dropped. A waiter resolves with the resuming connection's ``(read, done)``, with ``None`` when
the session's slot went to a new stream, or is cancelled when the daemon stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from .hub import Source
from .protocol import POLICY_VIOLATION, ProtocolError, Start

__all__ = ["DetachedSessions"]


class DetachedSessions:
    def __init__(self, resume_s: float, max_detached: int, max_streams: int) -> None:
        self.resume_s = resume_s
        self.max_detached = max_detached
        self.max_streams = max_streams
        self._waiting: dict[str, tuple[Source, asyncio.Future]] = {}  # oldest first

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, session: str) -> bool:
        return session in self._waiting

    def sources(self) -> Iterator[Source]:
        """The detached sessions' sources, oldest first."""
        return (source for source, _ in self._waiting.values())

    def detach(self, source: Source, live_count: int) -> asyncio.Future:
        """``source``'s client went away: its session waits; the future to wait on."""
        waiter: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[source.session] = (source, waiter)
        self.make_room(live_count)
        return waiter

    def forget(self, source: Source) -> None:
        self._waiting.pop(source.session, None)

    def make_room(self, live_count: int) -> None:
        """Finalise the oldest detached sessions while there are more than ``max_detached``, or
        while they and ``live_count`` live streams together are more than ``max_streams``."""
        while self._waiting and (
            len(self._waiting) > self.max_detached or live_count + len(self._waiting) > self.max_streams
        ):
            session = next(iter(self._waiting))
            _, waiter = self._waiting.pop(session)
            if not waiter.done():
                waiter.set_result(None)  # the session's task finalises it

    def resume(self, start: Start, stopping: bool) -> tuple[Source, asyncio.Future]:
        """The detached session ``start`` resumes, no longer waiting; or a fatal error."""
        assert start.resume is not None
        entry = self._waiting.get(start.resume.session)
        if entry is None or stopping:
            raise ProtocolError(
                "unknown_session",
                f"no session {start.resume.session} is waiting to resume: it ended, or its client was away for more"
                f" than {self.resume_s:g} s",
                fatal=True,
                close_code=POLICY_VIOLATION,
            )
        source, waiter = entry
        if start.source is not None and start.source != source.id:
            raise ProtocolError(
                "bad_start", f"session {source.session} is source {source.id!r}, not {start.source!r}", True
            )
        del self._waiting[start.resume.session]
        source.detached = False
        return source, waiter

    def cancel_all(self) -> None:
        """No resumes while stopping: those sessions finalise now."""
        for _, waiter in list(self._waiting.values()):
            waiter.cancel()
