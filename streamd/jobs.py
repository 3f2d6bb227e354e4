"""The streaming core's jobs on the engine: a job's text as tokens in, the engine's timed words
back as stream times. The one place the sans-I/O core (:mod:`streamd.stream`) meets
:mod:`whisper_engine`, so that the core is tested with scripted words and no model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from whisper_engine.engine import Engine, WindowRequest
from whisper_engine.timing import Word
from whisper_engine.tokenizer import WhisperTokenizer

from .policy import TimedWord
from .stream import Job

__all__ = ["run_job", "run_jobs"]


def run_jobs(engine: Engine, jobs: list[Job], mels: Sequence[np.ndarray | None]) -> list[list[TimedWord]]:
    """Decode each job's window after its committed prefix: greedy, word timestamps, no
    temperature fallback (it would cost latency on exactly the windows that are late). The jobs
    (of different streams) are one ``Engine.continue_windows`` batch: on a batching backend their
    windows share one encoder launch and their decoder steps one launch per step. ``mels[i]``:
    job ``i``'s window mel if it was computed ahead (``Engine.window_padding``), else ``None``."""
    requests = []
    for job, mel in zip(jobs, mels, strict=True):
        prompt, prefix = _tokens(engine.tokenizer, job)
        requests.append(WindowRequest(job.audio, prompt, prefix, round(job.min_window_s * 100), mel))
    results = engine.continue_windows(requests)
    return [_stream_words(job, words) for job, words in zip(jobs, results, strict=True)]


def run_job(engine: Engine, job: Job) -> list[TimedWord]:
    """:func:`run_jobs` of a batch of one (tests and the simulator)."""
    return run_jobs(engine, [job], [None])[0]


def _tokens(tok: WhisperTokenizer, job: Job) -> tuple[list[int], list[int]]:
    """A job's prompt and forced prefix as tokens."""
    prompt = tok.encode(" " + job.prompt.strip()) if job.prompt.strip() else []
    prefix = tok.encode(job.prefix) if job.prefix else []
    return prompt, prefix


def _stream_words(job: Job, words: list[Word]) -> list[TimedWord]:
    """Window-relative words as stream times."""
    return [TimedWord(w.word, job.offset + w.start, job.offset + w.end, w.p) for w in words]
