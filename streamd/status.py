"""What the daemon says of itself: ``/healthz``, ``/v1/sources`` and the figures ``/metrics``
reads, as one view over the engine, the scheduler, the hub and the detached sessions. No I/O:
the server serves it, :mod:`streamd.metrics` reads it."""

from __future__ import annotations

import asyncio
import time

from whisper_engine.engine import Engine

from .hub import Hub
from .scheduler import Scheduler
from .sessions import DetachedSessions

__all__ = ["Status"]


class Status:
    def __init__(self, engine: Engine, scheduler: Scheduler, hub: Hub, detached: DetachedSessions) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.hub = hub
        self.detached = detached
        self.started = time.monotonic()  # for the uptime
        self.stopping = False
        self.draining = False  # told to stop: live streams may finish, no new ones (a proxy's cue)

    @property
    def devices(self) -> dict[str, str]:
        """The device that runs each stage for live streams: their mel frames are computed on the
        CPU as audio arrives (``StreamingMel``), except on a backend that computes a window's mel
        from its audio on its device (``Backend.mel_from_audio``)."""
        if self.scheduler.mel_ahead:
            return {**self.engine.devices, "mel": "cpu"}
        return dict(self.engine.devices)

    def device_memory(self) -> dict[str, int] | None:
        """The backend's device-memory report (the cuda backend: decoder state per stream and in
        all, the allocator's counters on a GPU); ``None`` where the backend keeps no device state."""
        return self.engine.backend.memory_report() or None

    def sources(self) -> list[dict]:
        return [
            {"id": s.id, "kind": s.kind, "session": s.session, "live": True, "time": round(s.stream.time, 2)}
            | ({"detached": True} if s.session in self.detached else {})
            for s in self.hub.sources.values()
        ]

    def health(self) -> dict:
        stats = self.scheduler.stats
        lags = [s.lag for s in self.hub.sources.values()]
        memory = self.device_memory()
        return {
            "status": "stopping" if self.stopping else "draining" if self.draining else "ok",
            "model": self.engine.model_name,
            "devices": self.devices,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "streams": [
                {**info, "lag_s": round(s.lag, 3), "finals": s.finals}
                for info, s in zip(self.sources(), self.hub.sources.values(), strict=True)
            ],
            "viewers": self.hub.viewer_count,
            "lag_s": round(max(lags, default=0.0), 3),
            "asyncio_tasks": _task_count(),  # a leak check for soak and churn runs
            "engine": {
                "jobs": stats.jobs,
                "failures": stats.failures,
                "busy_s": round(stats.busy_s, 3),
                "mel_s": round(stats.mel_s, 3),
                "mel_overlap_s": round(stats.mel_overlap_s, 3),
                "window_mel_s": round(stats.window_mel_s, 3),
                "max_batch": self.scheduler.max_batch,
                "batches": stats.batches,
                "last_batch": stats.last_batch,
                "largest_batch": stats.largest_batch,
                "batch_s": {k: round(v, 3) for k, v in self.engine.batch_seconds.items()},
                **({"device_memory": memory} if memory is not None else {}),
            },
        }


def _task_count() -> int:
    """The event loop's tasks (none outside one)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0
