"""One engine, many streams: decode jobs run on engine threads, most urgent first.

A job is built only when the engine is free (``Stream.next_job`` at dispatch time), so a
stream that waited decodes its newest audio rather than a stale window, and a busy engine
degrades into fewer, longer windows instead of a growing queue. Finals (speech has ended)
go first, then the stream whose audio has waited longest. The event loop never runs model
code: it only feeds audio and sends messages.

Jobs of different streams are not batched into one product: on the CPU backend that costs
more than it saves (OpenBLAS packs the whole matrix for a multi-row product; see
``benchmarks/batching.py``). With ``workers`` > 1, jobs of different streams run side by side
on their own threads (each BLAS call single-threaded), one per core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .hub import Source
from .policy import TimedWord
from .protocol import ProtocolError
from .stream import Job, run_job

__all__ = ["Scheduler", "SchedulerStats"]

log = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    jobs: int = 0
    final_jobs: int = 0
    failures: int = 0
    busy_s: float = 0.0  # wall time the engine spent on jobs
    audio_s: float = 0.0  # seconds of window audio decoded (windows overlap: more than the input)
    mel_s: float = 0.0  # mel frames computed as audio arrived (the pipeline's first stage)
    mel_overlap_s: float = 0.0  # ... of which while the engine was running a job
    window_mel_s: float = 0.0  # assembling a job's mel from those frames, at dispatch
    most_concurrent: int = 0  # jobs running at once, at most (≤ workers)


class Scheduler:
    """Two stages on two threads, double-buffered: the mel thread turns each stream's new audio
    into mel frames as it arrives, while the engine thread encodes and decodes; a job's window
    mel is then a slice of frames already computed."""

    def __init__(self, engine, run: Callable[..., list[TimedWord]] = run_job, workers: int = 1) -> None:
        self.engine = engine
        self._run = run
        self.workers = workers  # engine threads: jobs of different streams may run at once
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="engine")
        self._mel_executor = ThreadPoolExecutor(1, thread_name_prefix="mel")
        self._engines_busy = 0
        self._busy_lock = threading.Lock()
        self._running: set[asyncio.Task] = set()
        self._sources: set[Source] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.stats = SchedulerStats()
        self.on_job: Callable[[Job, float], None] | None = None  # (job, seconds) for metrics

    def add(self, source: Source) -> None:
        self._sources.add(source)
        self.wake()

    def remove(self, source: Source) -> None:
        self._sources.discard(source)

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        for task in [t for t in (self._task, *self._running) if t is not None]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._executor.shutdown(wait=True)
        self._mel_executor.shutdown(wait=True)

    def push_audio(self, source: Source) -> None:
        """Queue the mel of ``source``'s new audio on the mel thread; nothing while it is silent."""
        stream = source.stream
        if stream.idle:
            return
        start = stream.buffer_start_sample
        if source.mel_sent < start:  # after a silence: the cache starts again with the pre-roll
            self._mel_executor.submit(source.mel.reset, start)
            source.mel_sent = start
        audio = stream.audio_from(source.mel_sent)
        source.mel_sent = stream.received
        self._mel_executor.submit(self._push, source, audio)

    def _push(self, source: Source, audio) -> None:
        busy, started = self._engines_busy > 0, time.perf_counter()
        source.mel.push(audio)
        elapsed = time.perf_counter() - started
        self.stats.mel_s += elapsed
        if busy:
            self.stats.mel_overlap_s += elapsed

    def _window_mel(self, source: Source, job: Job):
        """The job's mel from the frames computed ahead (on the mel thread, after pending pushes)."""
        started = time.perf_counter()
        padding = self.engine.window_padding(len(job.audio), round(job.min_window_s * 100))
        mel = source.mel.window(job.start_sample, job.audio, padding)
        source.mel.trim(job.start_sample)
        self.stats.window_mel_s += time.perf_counter() - started
        return mel

    def _job(self, job: Job, mel) -> list[TimedWord]:
        with self._busy_lock:
            self._engines_busy += 1
            self.stats.most_concurrent = max(self.stats.most_concurrent, self._engines_busy)
        try:
            return self._run(self.engine, job, mel)
        finally:
            with self._busy_lock:
                self._engines_busy -= 1

    @property
    def waiting(self) -> int:
        """Streams with audio waiting for a decode (not counting the one decoding)."""
        return sum(1 for s in self._sources if not s.stream.busy and (s.stream.final_pending or s.stream.lag > 0.0))

    def _pick(self) -> tuple[Source, Job] | None:
        order = sorted(self._sources, key=lambda s: (not s.stream.final_pending, -s.stream.lag))
        for source in order:
            job = source.stream.next_job()
            if job is not None:
                return source, job
            if source.stream.idle:
                source.progressed()  # it may have just closed its utterance without a decode
        return None

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while len(self._running) < self.workers and (picked := self._pick()) is not None:
                task = asyncio.create_task(self._execute(*picked))
                self._running.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self.wake()

    async def _execute(self, source: Source, job: Job) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            mel = await loop.run_in_executor(self._mel_executor, self._window_mel, source, job)
            words = await loop.run_in_executor(self._executor, self._job, job, mel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a model failure must not take the other streams down
            log.exception("decode failed for source %s", source.id)
            self.stats.failures += 1
            source.publish(ProtocolError("engine_error", f"decoding failed: {exc}").message())
            words = []
        elapsed = time.perf_counter() - started
        self.stats.jobs += 1
        self.stats.final_jobs += job.final
        self.stats.busy_s += elapsed
        self.stats.audio_s += len(job.audio) / 16000
        if self.on_job is not None:
            self.on_job(job, elapsed)
        source.emit(source.stream.on_result(job, words))
        source.progressed()
