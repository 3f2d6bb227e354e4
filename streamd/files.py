"""Whole recordings through the engine, as ``streamd transcribe`` and the file API both run them:
the VAD's speech spans, then windows seeking on timestamps; and the daemon's bounded queue
that runs them beside the live streams.

File work runs on a thread of its own, not on the live engine's threads: a recording is several
windows decoded one after another, and a live final that waited behind them would be late. With
one BLAS thread per engine thread (the default) the two share the cores instead of one queue.
While no live stream runs, a recording may use every core (``idle_threads`` BLAS threads):
measured on the 2-core build machine, the 20 dev recordings under 30 s took 10% less time with
2 threads than with 1 (BENCHMARKS.md, "Files over HTTP"). OpenBLAS's thread count is the
process's, so a live stream that starts meanwhile decodes with it too until that recording is
done.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from whisper_engine.engine import Engine
from whisper_engine.transcribe import Segment, TranscribeOptions, Transcript, transcribe

from .audio import SAMPLE_RATE
from .vad import VadConfig, plan_windows, speech_regions

__all__ = ["FileQueue", "FileStats", "QueueFull", "transcribe_file"]


def transcribe_file(
    engine: Engine,
    audio: np.ndarray,
    options: TranscribeOptions,
    vad: VadConfig | None,
    progress: Callable[[float, float], None] | None = None,
    on_segment: Callable[[Segment], None] | None = None,
) -> Transcript:
    """Transcribe a whole recording: only the speech the VAD finds (music and noise give no
    words; ``VadConfig()`` is what both callers use), or everything when ``vad`` is ``None``."""
    spans = None if vad is None else plan_windows(speech_regions(audio, vad))
    return transcribe(engine, audio, options, progress=progress, spans=spans, on_segment=on_segment)


class QueueFull(Exception):
    """Too many file requests waiting; ``retry_after_s``: when one is likely to have finished."""

    def __init__(self, pending: int, retry_after_s: int) -> None:
        super().__init__(f"{pending} file requests are waiting, the most this daemon queues")
        self.retry_after_s = retry_after_s


@dataclass
class FileStats:
    requests: int = 0
    refused: int = 0  # turned away with the queue full
    failures: int = 0
    audio_s: float = 0.0
    busy_s: float = 0.0  # wall time spent transcribing


class FileQueue:
    """At most ``max_pending`` recordings waiting or running, ``workers`` at a time."""

    def __init__(
        self,
        engine: Engine,
        vad: VadConfig | None,
        max_pending: int = 8,
        workers: int = 1,
        idle_threads: int | None = None,
        live_idle: Callable[[], bool] = lambda: False,
    ) -> None:
        if max_pending < 1 or workers < 1:
            raise ValueError("a file queue needs room for one request and one worker")
        self.engine = engine
        self.vad = vad
        self.idle_threads = idle_threads  # BLAS threads while no live stream runs (None: leave them)
        self.live_idle = live_idle
        self.max_pending = max_pending
        self.pending = 0
        self.stats = FileStats()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="files")
        self._workers = workers

    async def transcribe(
        self, audio: np.ndarray, options: TranscribeOptions, on_segment: Callable[[Segment], None] | None = None
    ) -> Transcript:
        """Transcribe on the file thread; raises :class:`QueueFull` when ``max_pending`` are
        already in. ``on_segment`` is called on the event loop's thread."""
        self.check_room()
        loop = asyncio.get_running_loop()
        hook = None
        if on_segment is not None:
            hook = lambda seg: loop.call_soon_threadsafe(on_segment, seg)  # noqa: E731
        self.pending += 1
        self.stats.requests += 1
        started = time.perf_counter()
        try:
            return await loop.run_in_executor(self._executor, self._run, audio, options, hook)
        except Exception:
            self.stats.failures += 1
            raise
        finally:
            self.pending -= 1
            self.stats.busy_s += time.perf_counter() - started
            self.stats.audio_s += len(audio) / SAMPLE_RATE

    def _run(self, audio: np.ndarray, options: TranscribeOptions, hook) -> Transcript:
        with self._threads():
            return transcribe_file(self.engine, audio, options, self.vad, on_segment=hook)

    def _threads(self) -> contextlib.AbstractContextManager:
        """Every core for this recording when no live stream runs (and one worker, so that two
        recordings do not each take them all)."""
        if self.idle_threads is None or self._workers > 1 or not self.live_idle():
            return contextlib.nullcontext()
        from threadpoolctl import threadpool_limits

        return threadpool_limits(self.idle_threads, user_api="blas")

    def check_room(self) -> None:
        """Raise :class:`QueueFull` (and count the refusal) when no request can join now."""
        if self.pending >= self.max_pending:
            self.stats.refused += 1
            raise QueueFull(self.pending, self._retry_after())

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the queue's work at the pace seen so far."""
        done = self.stats.requests - self.pending
        each = self.stats.busy_s / done if done > 0 else 1.0
        return max(1, math.ceil(each * self.pending / self._workers))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
