"""One engine, many streams: decode jobs run on engine threads, most urgent first.

A job is built only when the engine is free (``Stream.next_job`` at dispatch time), so a
stream that waited decodes its newest audio rather than a stale window, and a busy engine
degrades into fewer, longer windows instead of a growing queue. Finals (speech has ended)
go first, then the stream whose audio has waited longest. The event loop never runs model
code: it only feeds audio and sends messages.

There is one job path: a free engine thread takes up to ``max_batch`` ready jobs, most urgent
first and one per stream, and runs them as one batch (:func:`~streamd.jobs.run_jobs`); a lone
job is a batch of one. The backend states how many it takes (``Backend.max_batch``). On the CPU
(and NPU) that is one: batching jobs of different streams into one product costs more than it
saves there (OpenBLAS packs the whole matrix for a multi-row product; see
``benchmarks/batching.py``), and with ``workers`` > 1 jobs of different streams run side by side
on their own threads (each BLAS call single-threaded), one per core. On the GPU a launch costs
about the same for one window as for dozens, so a batch holds up to the ``--max-batch`` setting.

Where a window's mel is computed is the backend's to say, once (``Backend.mel_from_audio``).
Either the mel thread turns each stream's new audio into mel frames as it arrives and a job's
window mel is a slice of them (the CPU and NPU backends), or the device computes a batch's window
mels itself in one STFT launch and the host computes no mel frames (the GPU: at hundreds of
streams the CPU mel thread was the bottleneck, and its work held the GIL that the event loop and
the engine thread need).
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
from typing import TYPE_CHECKING

import numpy as np

from .audio import SAMPLE_RATE
from .hub import Source
from .jobs import run_jobs
from .policy import TimedWord
from .protocol import ProtocolError
from .stream import Job

if TYPE_CHECKING:
    from whisper_engine.engine import Engine

__all__ = ["Scheduler", "SchedulerStats"]

log = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    jobs: int = 0
    failures: int = 0
    busy_s: float = 0.0  # wall time the engine spent on jobs
    audio_s: float = 0.0  # seconds of window audio decoded (windows overlap: more than the input)
    mel_s: float = 0.0  # mel frames computed as audio arrived (the pipeline's first stage)
    mel_overlap_s: float = 0.0  # ... of which while the engine was running a job
    window_mel_s: float = 0.0  # assembling a job's mel from those frames, at dispatch
    most_concurrent: int = 0  # jobs (or batches) running at once, at most (≤ workers)
    batches: int = 0  # engine runs (a lone job is a batch of one)
    last_batch: int = 0  # jobs in the latest batch
    largest_batch: int = 0


class Scheduler:
    """Two stages on two threads, double-buffered: the mel thread turns each stream's new audio
    into mel frames as it arrives, while the engine thread encodes and decodes; a job's window
    mel is then a slice of frames already computed."""

    def __init__(
        self,
        engine: Engine,
        workers: int = 1,
        max_batch: int = 64,
        run: Callable[[Engine, list[Job], list[np.ndarray | None]], list[list[TimedWord]]] = run_jobs,
    ) -> None:
        self.engine = engine
        self._run = run
        self.workers = workers  # engine threads: jobs of different streams may run at once
        #: Jobs per engine run: the setting, as far as the backend takes them (1 on CPU and NPU).
        self.max_batch = max(1, min(max_batch, engine.backend.max_batch))
        #: The mel thread computes each stream's mel frames as audio arrives (else the device
        #: computes a batch's window mels itself).
        self.mel_ahead = not engine.backend.mel_from_audio
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
        self.on_batch: Callable[[int], None] | None = None  # (jobs in one engine run) for metrics

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

    def feed(self, source: Source, samples: np.ndarray) -> None:
        """``samples`` into ``source``'s stream; the mel of its new audio queued on the mel thread
        (nothing while it is silent), and the engine woken."""
        source.feed(samples)
        stream = source.stream
        if self.mel_ahead and not stream.idle:
            self._push_mel(source)
        self.wake()

    def _push_mel(self, source: Source) -> None:
        stream = source.stream
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

    def _window_mels(self, batch: list[tuple[Source, Job]]) -> list[np.ndarray | None]:
        return [self._window_mel(source, job) for source, job in batch]

    async def _batch_mels(self, batch: list[tuple[Source, Job]]) -> list[np.ndarray | None]:
        """The batch's window mels from the frames computed ahead, or ``None`` for each when the
        device computes them in the batch (not :attr:`mel_ahead`)."""
        if not self.mel_ahead:
            return [None] * len(batch)
        return await asyncio.get_running_loop().run_in_executor(self._mel_executor, self._window_mels, batch)

    def _run_counted(self, jobs: list[Job], mels: list[np.ndarray | None]) -> list[list[TimedWord]]:
        """The jobs on an engine thread, counted as busy while they run."""
        with self._busy_lock:
            self._engines_busy += 1
            self.stats.most_concurrent = max(self.stats.most_concurrent, self._engines_busy)
        try:
            return self._run(self.engine, jobs, mels)
        finally:
            with self._busy_lock:
                self._engines_busy -= 1

    @property
    def waiting(self) -> int:
        """Streams with audio waiting for a decode (not counting the one decoding)."""
        return sum(1 for s in self._sources if not s.stream.busy and (s.stream.final_pending or s.stream.lag > 0.0))

    def _pick_batch(self) -> list[tuple[Source, Job]]:
        """Up to ``max_batch`` jobs, most urgent first, one per stream (a stream with a job out
        has none to give)."""
        batch: list[tuple[Source, Job]] = []
        for source in sorted(self._sources, key=_urgency):
            if len(batch) >= self.max_batch:
                break
            job = source.stream.next_job()
            if job is not None:
                batch.append((source, job))
            elif source.stream.idle:
                source.progressed()
        return batch

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while len(self._running) < self.workers:
                batch = self._pick_batch()
                if not batch:
                    break
                task = asyncio.create_task(self._execute(batch))
                self._running.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self.wake()

    async def _execute(self, batch: list[tuple[Source, Job]]) -> None:
        """One engine run for the batch's jobs (one job or many streams'). A failed batch of many
        is retried job by job, so that one bad window costs only its own stream's text."""
        started = time.perf_counter()
        jobs = [job for _, job in batch]
        mels: list[np.ndarray | None] | None = None
        try:
            mels = await self._batch_mels(batch)
            results = await self._in_engine(jobs, mels)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                results = [self._failed(batch[0][0], exc)]
            else:
                log.exception("a batch of %d jobs failed; running them one by one", len(batch))
                alone = mels or [None] * len(batch)  # None: the engine computes the window's mel itself
                results = [
                    await self._retry_alone(source, job, mel) for (source, job), mel in zip(batch, alone, strict=True)
                ]
        elapsed = time.perf_counter() - started
        self.stats.busy_s += elapsed
        self._count_batch(len(batch))
        for (source, job), words in zip(batch, results, strict=True):
            self._deliver(source, job, words, elapsed)

    async def _in_engine(self, jobs: list[Job], mels: list[np.ndarray | None]) -> list[list[TimedWord]]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run_counted, jobs, mels)

    async def _retry_alone(self, source: Source, job: Job, mel: np.ndarray | None) -> list[TimedWord]:
        try:
            return (await self._in_engine([job], [mel]))[0]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._failed(source, exc)

    def _failed(self, source: Source, exc: Exception) -> list[TimedWord]:
        """A job that failed: logged, counted, an ``engine_error`` to its stream, no words. A model
        failure must not take the other streams down."""
        log.error("decode failed for source %s", source.id, exc_info=exc)
        self.stats.failures += 1
        source.publish(ProtocolError("engine_error", f"decoding failed: {exc}").message())
        return []

    def _count_batch(self, size: int) -> None:
        self.stats.batches += 1
        self.stats.last_batch = size
        self.stats.largest_batch = max(self.stats.largest_batch, size)
        if self.on_batch is not None:
            self.on_batch(size)

    def _deliver(self, source: Source, job: Job, words: list[TimedWord], elapsed: float) -> None:
        """A job's words back to its stream; partials and finals out."""
        self.stats.jobs += 1
        self.stats.audio_s += len(job.audio) / SAMPLE_RATE
        if self.on_job is not None:
            self.on_job(job, elapsed)
        source.emit(source.stream.on_result(job, words))
        source.progressed()


def _urgency(source: Source) -> tuple[bool, float]:
    """Sort key: due finals first, the longest-waiting first (wall clock, so a stream that stopped
    is not passed over by newer streams with more audio waiting)."""
    return (not source.stream.final_pending, -source.waited)
