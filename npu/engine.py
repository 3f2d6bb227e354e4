"""The engine: one loaded model (weights, tokenizer, backend) and window-level operations.

Everything above this — offline transcription with seeking, the streaming daemon — works in
windows: encode a stretch of audio once, decode it (with temperature fallback), time its words.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .backend import STAGES, Backend
from .backends import create_backend
from .decoding import DecodingOptions, DecodingResult, decode
from .mel import HOP_LENGTH, N_FRAMES, SAMPLE_RATE, SILENT_LOG_MEL
from .timing import WordTiming, find_alignment, merge_punctuations
from .tokenizer import WhisperTokenizer
from .weights import WhisperWeights, load_weights

__all__ = ["EncodedWindow", "Engine", "FallbackPolicy"]

log = logging.getLogger(__name__)

# Unpadded windows: Whisper was trained on 30 s windows padded with silence, and on a window
# that ends with the speech it tends not to emit the closing timestamp and starts over. Measured
# on the dev corpus (BENCHMARKS.md): the real audio plus 1 s of silence, and at least 15 s in
# all, gives the WER of padded windows with no padded retries.
UNPADDED_TAIL_FRAMES = 100
MIN_UNPADDED_FRAMES = 1500


@dataclass(frozen=True)
class FallbackPolicy:
    """Re-decode at rising temperatures when a result looks like a loop or garbage.

    Bounded by ``temperatures``; an empty tail (just ``(0.0,)``) turns it off.
    """

    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    certain_no_speech: float | None = 0.9

    def is_silence(self, r: DecodingResult) -> bool:
        """Likely no speech: the no-speech probability is high and the text unlikely (Whisper's
        rule), or the no-speech probability alone is near certain: on digital silence tiny.en
        says "you" with a fair log-probability, and a no-speech probability of 0.99 (on the dev
        corpus, windows with speech stay below 0.6)."""
        if self.no_speech_threshold is None or r.no_speech_prob <= self.no_speech_threshold:
            return False
        if self.certain_no_speech is not None and r.no_speech_prob >= self.certain_no_speech:
            return True
        return self.logprob_threshold is None or r.avg_logprob < self.logprob_threshold

    def needs_fallback(self, r: DecodingResult) -> bool:
        if self.logprob_threshold is not None and self.is_silence(r):
            return False  # silence: a low score is expected, retrying would only hallucinate
        if self.compression_ratio_threshold is not None and r.compression_ratio > self.compression_ratio_threshold:
            return True
        return self.logprob_threshold is not None and r.avg_logprob < self.logprob_threshold


NO_FALLBACK = FallbackPolicy(temperatures=(0.0,))
STREAM_SILENCE = FallbackPolicy(temperatures=(0.0,), certain_no_speech=None)


@dataclass
class EncodedWindow:
    """A window's encoder output, how much real audio it covers, and the mel it came from
    (kept so that a failed unpadded decode can be retried on the padded window)."""

    features: object  # backend-specific, possibly on the device
    num_frames: int  # mel frames of real audio (excluding any padding)
    padded: bool
    mel: np.ndarray  # [n_mels, N_FRAMES]: the real frames followed by silence

    @property
    def duration(self) -> float:
        return self.num_frames * HOP_LENGTH / SAMPLE_RATE


class Engine:
    """A model ready to run: ``Engine.load()`` takes the bundled tiny.en on the best backend."""

    def __init__(self, weights: WhisperWeights, backend: Backend, tokenizer: WhisperTokenizer) -> None:
        self.weights = weights
        self.backend = backend
        self.tokenizer = tokenizer
        self.tail_frames = UNPADDED_TAIL_FRAMES
        self.min_window_frames = MIN_UNPADDED_FRAMES
        self.retry_padded = True  # re-run failed unpadded windows padded (off only to measure)
        self.padded_retries = 0  # unpadded windows that had to be re-run padded (a health figure)
        self.stage_seconds = dict.fromkeys(STAGES, 0.0)  # streaming compute per stage (metrics)
        self._stage_lock = threading.Lock()

    @classmethod
    def load(cls, model: str | Path | None = None, backend: str = "auto") -> Engine:
        weights = load_weights(model)
        tokenizer = WhisperTokenizer(weights.path / "tokenizer.json", weights.dims.n_vocab)
        return cls(weights, create_backend(weights, backend), tokenizer)

    def _account(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        with self._stage_lock:
            self.stage_seconds[stage] += now - since
        return now

    @property
    def model_name(self) -> str:
        return self.weights.name

    @property
    def devices(self) -> dict[str, str]:
        return self.backend.devices

    def encode(
        self,
        mel: np.ndarray,
        num_frames: int | None = None,
        pad_to_30s: bool = False,
        min_frames: int | None = None,
    ) -> EncodedWindow:
        """Encode the first ``num_frames`` frames of ``mel`` as one window.

        ``mel`` should run on past the real audio into silence (``log_mel(..., padding=N_SAMPLES)``
        gives that). Unpadded (the default) encodes the real frames plus ``tail_frames`` of that
        silence, at least ``min_window_frames``, so a short window costs a fraction of a 30 s one;
        ``pad_to_30s`` encodes 3000 frames, as Whisper was trained. ``min_frames`` overrides
        ``min_window_frames`` (streaming trades a little accuracy for latency there).
        """
        num_frames = min(mel.shape[-1] if num_frames is None else num_frames, N_FRAMES)
        if mel.shape[-1] < N_FRAMES:
            # Silence is the log-mel floor: the window's minimum, or that of digital silence.
            fill = float(mel.min()) if mel.size else SILENT_LOG_MEL
            mel = np.pad(mel, ((0, 0), (0, N_FRAMES - mel.shape[-1])), constant_values=fill)
        mel = mel[:, :N_FRAMES]
        if pad_to_30s:
            frames = N_FRAMES
        else:
            minimum = self.min_window_frames if min_frames is None else min_frames
            frames = min(N_FRAMES, max(num_frames + self.tail_frames, minimum))
            frames += frames % 2
        return EncodedWindow(self.backend.encode(mel[:, :frames]), num_frames, frames == N_FRAMES, mel)

    def decode(
        self,
        window: EncodedWindow,
        options: DecodingOptions,
        fallback: FallbackPolicy = NO_FALLBACK,
    ) -> tuple[DecodingResult, EncodedWindow]:
        """Decode a window, retrying at higher temperatures while ``fallback`` says so.

        An unpadded window whose result loops or fails the quality checks at temperature 0
        (``fallback``'s, or the defaults when fallback is off) is re-encoded padded to 30 s and
        decoded again, before any temperature is raised: padding is the regime Whisper was
        trained in. Returns the result and the window it came from.
        """
        if not window.padded and self.retry_padded:
            first = self._decode_at(window, replace(options, loop_guard=True, max_timestamp=window.duration), 0.0)
            if not first.looped and not self._fails(first, fallback):
                return first, window
            self.padded_retries += 1
            log.debug("unpadded window failed (looped=%s); re-encoding padded", first.looped)
            window = self.encode(window.mel, window.num_frames, pad_to_30s=True)
        result: DecodingResult | None = None
        for temperature in fallback.temperatures:
            result = self._decode_at(window, options, temperature)
            if not fallback.needs_fallback(result):
                break
            log.debug(
                "fallback from T=%.1f: cr=%.2f lp=%.2f", temperature, result.compression_ratio, result.avg_logprob
            )
        assert result is not None
        return result, window

    @staticmethod
    def _fails(result: DecodingResult, fallback: FallbackPolicy) -> bool:
        checks = fallback if len(fallback.temperatures) > 1 else FallbackPolicy()
        return checks.needs_fallback(result)

    def _decode_at(self, window: EncodedWindow, options: DecodingOptions, temperature: float) -> DecodingResult:
        return decode(
            self.backend,
            window.features,
            self.tokenizer,
            replace(options, temperature=temperature),
            self.weights.suppress_tokens,
            self.weights.suppress_tokens_begin,
        )

    def word_timings(self, window: EncodedWindow, text_tokens: list[int], token_probs: list[float]) -> list[WordTiming]:
        """Words of ``text_tokens`` with times relative to the window; a word's probability is
        the mean of its tokens' ``token_probs`` (the decoder's, as it chose them)."""
        words = find_alignment(
            self.backend, window.features, self.tokenizer, text_tokens, token_probs, window.num_frames
        )
        return merge_punctuations(words)

    def window_padding(self, num_samples: int, min_frames: int | None = None) -> int:
        """Zero samples :meth:`continue_window` appends to a window of ``num_samples``: only as
        much trailing silence as the encoder will use (an update runs every fraction of a second,
        and a 30 s pad would triple the STFT work of a short window)."""
        num_frames = min(num_samples // HOP_LENGTH, N_FRAMES)
        minimum = self.min_window_frames if min_frames is None else min_frames
        return (max(minimum - num_frames, 0) + self.tail_frames + 1) * HOP_LENGTH

    def continue_window(
        self,
        audio: np.ndarray,
        prompt: list[int],
        prefix: list[int],
        min_frames: int | None = None,
        mel: np.ndarray | None = None,
    ) -> list[WordTiming]:
        """Decode ``audio`` (at most 30 s) after a forced ``prefix`` of tokens already known for
        its start; return the timed words that follow the prefix (times relative to the audio).

        For streaming: the prefix goes through the decoder in one batched pass, so an update
        costs decoder steps only for the new words. No timestamps are decoded (word times come
        from the alignment heads); a loop is cut where it starts. ``mel``, when given, is the
        window's mel computed ahead: ``audio`` followed by :meth:`window_padding` zeros.
        """
        num_frames = min(len(audio) // HOP_LENGTH, N_FRAMES)
        if num_frames < 2:
            return []
        clock = time.perf_counter()
        if mel is None:
            mel = self.backend.log_mel(audio, padding=self.window_padding(len(audio), min_frames))
            clock = self._account("mel", clock)
        window = self.encode(mel[:, :N_FRAMES], num_frames=num_frames, min_frames=min_frames)
        clock = self._account("encoder", clock)
        options = DecodingOptions(without_timestamps=True, prompt=tuple(prompt), prefix=tuple(prefix), loop_guard=True)
        result = self._decode_at(window, options, 0.0)
        clock = self._account("decoder", clock)
        # The caller's VAD heard speech: only Whisper's own silence rule applies here (a
        # near-certain no-speech alone would drop the words of a quiet utterance's end).
        if STREAM_SILENCE.is_silence(result) or not result.tokens:
            return []
        probs = [1.0] * len(prefix) + list(np.exp(result.token_logprobs[: len(result.tokens)]))
        words = self.word_timings(window, [*prefix, *result.tokens], probs)
        self._account("decoder", clock)  # alignment is a decoder pass
        seen, new = 0, []
        for w in words:
            if seen >= len(prefix):
                new.append(w)
            seen += len(w.tokens)
        return new
