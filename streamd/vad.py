"""Voice activity gate: webrtcvad decisions turned into speech regions, sans I/O.

Feed audio in any chunk sizes; get back the regions where speech starts and ends. A region
opens ``pre_roll_s`` before the first voiced frame (word onsets are quiet and webrtcvad is late
on them) and closes after ``hangover_s`` of unvoiced frames (so a short pause does not split a
sentence). The same object serves the live daemon and offline transcription.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SpeechRegion", "VadConfig", "VadGate", "plan_windows", "speech_regions"]

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class VadConfig:
    aggressiveness: int = 2  # webrtcvad 0 (lenient) .. 3 (strict)
    frame_ms: int = 30  # webrtcvad takes 10, 20 or 30 ms
    pre_roll_s: float = 0.3
    hangover_s: float = 0.5
    min_speech_s: float = 0.1  # shorter bursts (clicks, coughs) are not speech

    def __post_init__(self) -> None:
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"vad aggressiveness must be 0..3, got {self.aggressiveness}")
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"vad frame must be 10, 20 or 30 ms, got {self.frame_ms}")


@dataclass
class SpeechRegion:
    start: float  # seconds from the first sample fed
    end: float | None  # None while speech goes on


class VadGate:
    """Incremental VAD over 16 kHz mono float32 audio."""

    def __init__(self, config: VadConfig | None = None) -> None:
        import webrtcvad

        self.config = config or VadConfig()
        self._vad = webrtcvad.Vad(self.config.aggressiveness)
        self._frame = SAMPLE_RATE * self.config.frame_ms // 1000
        self._pending = np.zeros(0, np.int16)
        self._frames_seen = 0
        self._voiced_run = 0  # consecutive voiced frames
        self._unvoiced_run = 0
        self._open: SpeechRegion | None = None
        self._last_end = 0.0

    @property
    def time(self) -> float:
        """Seconds of audio decided so far."""
        return self._frames_seen * self._frame / SAMPLE_RATE

    @property
    def in_speech(self) -> bool:
        return self._open is not None

    def feed(self, audio: np.ndarray) -> list[SpeechRegion]:
        """Decide ``audio``; return what happened in it, in order: a region opening is reported
        with ``end=None``, its closing as a new record with ``end`` set."""
        pcm = np.clip(np.asarray(audio, np.float32) * 32768.0, -32768, 32767).astype(np.int16)
        buf = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        n = len(buf) // self._frame
        self._pending = buf[n * self._frame :].copy()
        events: list[SpeechRegion] = []
        frame_s = self._frame / SAMPLE_RATE
        min_voiced = max(1, round(self.config.min_speech_s / frame_s))
        hangover = max(1, round(self.config.hangover_s / frame_s))
        for i in range(n):
            voiced = self._vad.is_speech(buf[i * self._frame : (i + 1) * self._frame].tobytes(), SAMPLE_RATE)
            self._frames_seen += 1
            if voiced:
                self._voiced_run += 1
                self._unvoiced_run = 0
                if self._open is None and self._voiced_run >= min_voiced:
                    onset = (self._frames_seen - self._voiced_run) * frame_s
                    # Pre-roll, but never back into the region before.
                    start = max(0.0, self._last_end, onset - self.config.pre_roll_s)
                    self._open = SpeechRegion(start, None)
                    events.append(SpeechRegion(start, None))
            else:
                self._voiced_run = 0
                self._unvoiced_run += 1
                if self._open is not None and self._unvoiced_run >= hangover:
                    events.append(SpeechRegion(self._open.start, self.time))
                    self._last_end = self.time
                    self._open = None
        return events

    def flush(self) -> SpeechRegion | None:
        """End of audio: close an open region."""
        if self._open is None:
            return None
        region = SpeechRegion(self._open.start, self.time + len(self._pending) / SAMPLE_RATE)
        self._open = None
        self._last_end = region.end
        return region


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
