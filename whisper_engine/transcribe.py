"""Offline transcription of a whole recording: windows of up to 30 s, seeking on timestamps.

Each window is decoded with timestamps; complete ``<|t0|> text <|t1|>`` pairs become segments and
the next window starts at the last complete timestamp (or after the window when it ended in
silence). Previous text conditions the next window unless a fallback ran hot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .decoding import TIME_PRECISION, DecodingOptions, DecodingResult
from .engine import Engine, FallbackPolicy
from .mel import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from .timing import Word

__all__ = ["Segment", "TranscribeOptions", "Transcript", "Word", "transcribe"]

UNDECODED_SLACK_S = 3.0
LONG_SEGMENT_S = 15.0
SPARSE_TOKENS_PER_S = 2.0


@dataclass(frozen=True)
class TranscribeOptions:
    beam_size: int = 1
    patience: float = 1.0
    best_of: int = 5
    fallback: FallbackPolicy = field(default_factory=FallbackPolicy)
    condition_on_previous_text: bool = True
    initial_prompt: str | None = None
    word_timestamps: bool = True
    pad_to_30s: bool = False
    language: str | None = "en"


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    token_probs: list[float] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "text": self.text,
            "words": [
                {"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3), "p": round(w.p, 4)}
                for w in self.words
            ],
        }


@dataclass
class Transcript:
    text: str
    segments: list[Segment]
    duration: float

    def to_dict(self) -> dict:
        return {"text": self.text, "segments": [s.to_dict() for s in self.segments], "audio_s": self.duration}


def _split_segments(tokens: list[int], ts_begin: int, offset: float, window_s: float) -> tuple[list, int | None]:
    """Cut a window's tokens into (start, end, positions of its text tokens) triples.

    Returns the triples and the frame (relative to the window) where the next window should start,
    or ``None`` to continue right after this window.
    """
    is_ts = [t >= ts_begin for t in tokens]
    single_ending = len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    out = []
    if cuts:
        slices = cuts + ([len(tokens)] if single_ending else [])
        last = 0
        for cut in slices:
            piece = tokens[last:cut]
            start = (piece[0] - ts_begin) * TIME_PRECISION
            end = (piece[-1] - ts_begin) * TIME_PRECISION
            text = [i for i in range(last, cut) if tokens[i] < ts_begin]
            if text:
                out.append((offset + start, offset + end, text))
            last = cut
        if single_ending:
            return out, _resume_after(tokens[-1] - ts_begin, window_s)
        last_ts = tokens[last - 1] - ts_begin
        return out, round(last_ts * TIME_PRECISION * FRAMES_PER_SECOND)
    stamps = [t - ts_begin for t in tokens if t >= ts_begin]
    end = window_s
    if stamps and stamps[-1] > 0:
        end = stamps[-1] * TIME_PRECISION
    text = [i for i, t in enumerate(tokens) if t < ts_begin]
    if text:
        out.append((offset, offset + end, text))
    return out, _resume_after(stamps[-1], window_s) if stamps and text else None


def _skipped_speech(result: DecodingResult, ts_begin: int, window_s: float) -> bool:
    """Beam search sometimes ends a dense window early: a long stretch with few words, often
    closed by eot straight after the text, so that the rest of the window counts as decoded.
    True when a stretch longer than ``LONG_SEGMENT_S`` holds fewer than ``SPARSE_TOKENS_PER_S``
    text tokens per second."""
    spans: list[tuple[float, float, int]] = []  # (start, end, text tokens)
    start, count = 0.0, 0
    for t in result.tokens:
        if t >= ts_begin:
            if count:
                spans.append((start, (t - ts_begin) * TIME_PRECISION, count))
            start, count = (t - ts_begin) * TIME_PRECISION, 0
        else:
            count += 1
    if count:
        spans.append((start, window_s, count))
    return any(end - s > LONG_SEGMENT_S and n < SPARSE_TOKENS_PER_S * (end - s) for s, end, n in spans)


def _resume_after(last_timestamp: int, window_s: float) -> int | None:
    """Where to go on after a window whose text ended at ``last_timestamp``.

    Whisper skips the rest of the window, taking it for silence. When more than
    ``UNDECODED_SLACK_S`` of it is left, that is more often a decoder that stopped early (beam
    search favours short endings), so decode from the last timestamp again: if it really is
    silence, the no-speech check skips it at the cost of one more window.
    """
    end_s = last_timestamp * TIME_PRECISION
    if last_timestamp > 0 and end_s < window_s - UNDECODED_SLACK_S:
        return round(end_s * FRAMES_PER_SECOND)
    return None


def transcribe(
    engine: Engine,
    audio: np.ndarray,
    options: TranscribeOptions = TranscribeOptions(),
    progress: Callable[[float, float], None] | None = None,
    spans: list[tuple[float, float]] | None = None,
    on_segment: Callable[[Segment], None] | None = None,
) -> Transcript:
    """Transcribe 16 kHz mono float32 ``audio``; ``progress(done_s, total_s)`` is called per window,
    ``on_segment(segment)`` with each segment as its window is done (streamed answers).

    ``spans`` (seconds) restricts decoding to those stretches, e.g. the speech a VAD found, each
    decoded on its own (the text still conditions the next); ``None`` decodes everything.
    """
    duration = len(audio) / SAMPLE_RATE
    run = _Run(engine, options, duration, progress, on_segment)
    for start_s, end_s in spans if spans is not None else [(0.0, duration)]:
        first, last = round(start_s * SAMPLE_RATE), round(end_s * SAMPLE_RATE)
        run.span(audio[first:last], first / SAMPLE_RATE)
    text = "".join(s.text for s in run.segments).strip()
    return Transcript(text=text, segments=run.segments, duration=duration)


class _Run:
    """State carried across windows: segments so far and the text that conditions the next."""

    def __init__(self, engine: Engine, options: TranscribeOptions, duration: float, progress, on_segment) -> None:
        self.engine = engine
        self.options = options
        self.duration = duration
        self.progress = progress
        self.on_segment = on_segment
        self.segments: list[Segment] = []
        self.all_tokens: list[int] = []
        self.prompt_reset = 0
        if options.initial_prompt:
            self.all_tokens = engine.tokenizer.encode(" " + options.initial_prompt.strip())

    def span(self, audio: np.ndarray, base: float) -> None:
        """Decode ``audio`` (which starts ``base`` seconds into the recording), seeking on
        timestamps through windows of up to 30 s."""
        engine, options, tok = self.engine, self.options, self.engine.tokenizer
        mel = engine.backend.log_mel(audio, padding=N_SAMPLES)
        content_frames = max(0, mel.shape[-1] - N_FRAMES)
        seek = 0
        while seek < content_frames:
            size = min(N_FRAMES, content_frames - seek)
            window_s = size / FRAMES_PER_SECOND
            offset = base + seek * HOP_LENGTH / SAMPLE_RATE
            window = engine.encode(mel[:, seek : seek + N_FRAMES], num_frames=size, pad_to_30s=options.pad_to_30s)
            decode_opts = DecodingOptions(
                beam_size=options.beam_size,
                patience=options.patience,
                best_of=options.best_of,
                prompt=tuple(self.all_tokens[self.prompt_reset :]) if options.condition_on_previous_text else (),
                language=options.language,
            )
            result, window = engine.decode(window, decode_opts, options.fallback)
            if options.beam_size > 1 and _skipped_speech(result, tok.timestamp_begin, window_s):
                greedy, _ = engine.decode(window, replace(decode_opts, beam_size=1), options.fallback)
                if len(greedy.text.split()) > len(result.text.split()):
                    result = greedy
            next_seek = None
            if not options.fallback.is_silence(result):
                pieces, next_seek = _split_segments(result.tokens, tok.timestamp_begin, offset, window_s)
                # The decoder's own probability of each token (the loop guard's closing timestamp
                # has none; it is not text).
                probs = np.exp(result.token_logprobs[: len(result.tokens)])
                new_segments = [
                    Segment(
                        start=start,
                        end=end,
                        text=tok.decode([result.tokens[i] for i in positions]),
                        tokens=[result.tokens[i] for i in positions],
                        token_probs=[float(probs[i]) for i in positions],
                        avg_logprob=result.avg_logprob,
                        no_speech_prob=result.no_speech_prob,
                        compression_ratio=result.compression_ratio,
                        temperature=result.temperature,
                    )
                    for start, end, positions in pieces
                ]
                new_segments = [seg for seg in new_segments if seg.text.strip()]
                if options.word_timestamps and new_segments:
                    _add_words(engine, window, new_segments, offset)
                self.segments += new_segments
                if self.on_segment is not None:
                    for seg in new_segments:
                        self.on_segment(seg)
                self.all_tokens += [t for seg in new_segments for t in seg.tokens]
                if not options.condition_on_previous_text or result.temperature > 0.5:
                    self.prompt_reset = len(self.all_tokens)
            seek += next_seek if next_seek else size
            if self.progress:
                self.progress(min(self.duration, base + seek / FRAMES_PER_SECOND), self.duration)


def _add_words(engine: Engine, window, segments: list[Segment], offset: float) -> None:
    """Time every word of a window's segments in one alignment pass, then hand words back to
    their segments by token count."""
    tokens = [t for s in segments for t in s.tokens]
    probs = [p for s in segments for p in s.token_probs]
    timings = engine.word_timings(window, tokens, probs)
    i = 0
    for seg in segments:
        count = 0
        while i < len(timings) and count < len(seg.tokens):
            w = timings[i]
            start = min(max(offset + w.start, seg.start), seg.end)
            end = min(max(offset + w.end, start), seg.end)
            seg.words.append(replace(w, start=start, end=end))
            count += len(w.tokens)
            i += 1
    # Words of one window never go backwards in time.
    for seg in segments:
        for prev, w in zip(seg.words, seg.words[1:], strict=False):
            if w.start < prev.end:
                w.start = min(prev.end, w.end)
