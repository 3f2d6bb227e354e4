"""The engine: one loaded model (weights, tokenizer, backend) and window-level operations.

Everything above this — offline transcription with seeking, the streaming daemon — works in
windows: encode a stretch of audio once, decode it (with temperature fallback), time its words.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .backend import STAGES, Backend, BatchedBackend, GreedyResult
from .backends import create_backend
from .decoding import DecodingOptions, DecodingResult, compression_ratio, decode, initial_tokens, loop_start
from .guard import WindowGuard
from .mel import HOP_LENGTH, N_FRAMES, SAMPLE_RATE, SILENT_LOG_MEL
from .timing import Word, alignment_tokens, find_alignment, merge_punctuations, words_from_matrices
from .tokenizer import WhisperTokenizer
from .weights import WhisperWeights, load_weights

__all__ = ["EncodedWindow", "Engine", "FallbackPolicy", "WindowRequest"]

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
        # Wall time of the batched path's parts (``continue_windows``): device launches are
        # asynchronous, so "decode" also waits for the mel and encoder work queued before it.
        self.batch_seconds = dict.fromkeys(("launch", "decode", "align", "words"), 0.0)
        self._stage_lock = threading.Lock()
        self.guard = WindowGuard()  # what the decoder's own scores drop from a streamed window
        self.guard_dropped: dict[str, int] = {}  # windows dropped, per rule (a metrics figure)

    @classmethod
    def load(cls, model: str | Path | None = None, backend: str = "auto", device: str | None = None) -> Engine:
        """``device``: the torch device of the ``cuda`` backend (``cuda:1``; ``cpu`` runs the same
        graph on torch's CPU device, as the tests do); other backends ignore it."""
        weights = load_weights(model)
        tokenizer = WhisperTokenizer(weights.path / "tokenizer.json", weights.dims.n_vocab)
        return cls(weights, create_backend(weights, backend, device=device), tokenizer)

    def _guarded(self, result: DecodingResult) -> bool:
        """The window guard drops this streamed window (and counts the rule that fired)."""
        rule = self.guard.check(result)
        if rule is not None:
            with self._stage_lock:
                self.guard_dropped[rule] = self.guard_dropped.get(rule, 0) + 1
        return rule is not None

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
        mel, num_frames, frames = self._cut_window(mel, num_frames, pad_to_30s, min_frames)
        return EncodedWindow(self.backend.encode(mel[:, :frames]), num_frames, frames == N_FRAMES, mel)

    def _cut_window(
        self, mel: np.ndarray, num_frames: int | None, pad_to_30s: bool, min_frames: int | None
    ) -> tuple[np.ndarray, int, int]:
        """:meth:`encode`'s window policy: the mel run on to 30 s, its real frames, and how many
        frames the encoder takes."""
        num_frames = min(mel.shape[-1] if num_frames is None else num_frames, N_FRAMES)
        if mel.shape[-1] < N_FRAMES:
            # Silence is the log-mel floor: the window's minimum, or that of digital silence.
            fill = float(mel.min()) if mel.size else SILENT_LOG_MEL
            mel = np.pad(mel, ((0, 0), (0, N_FRAMES - mel.shape[-1])), constant_values=fill)
        mel = mel[:, :N_FRAMES]
        return mel, num_frames, N_FRAMES if pad_to_30s else self._encoder_frames(num_frames, min_frames)

    def _encoder_frames(self, num_frames: int, min_frames: int | None) -> int:
        """Frames an unpadded window of ``num_frames`` real frames is encoded with."""
        minimum = self.min_window_frames if min_frames is None else min_frames
        frames = min(N_FRAMES, max(num_frames + self.tail_frames, minimum))
        return frames + frames % 2

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

    def word_timings(self, window: EncodedWindow, text_tokens: list[int], token_probs: list[float]) -> list[Word]:
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
    ) -> list[Word]:
        """Decode ``audio`` (at most 30 s) after a forced ``prefix`` of tokens already known for
        its start; return the timed words that follow the prefix (times relative to the audio):
        :meth:`continue_windows` of a batch of one."""
        return self.continue_windows([WindowRequest(audio, prompt, prefix, min_frames, mel)])[0]

    def _continue_one(self, request: WindowRequest) -> list[Word]:
        """One window on a backend that takes one at a time: decoding's own search, greedy."""
        audio, prompt, prefix, min_frames, mel = (
            request.audio, request.prompt, request.prefix, request.min_frames, request.mel
        )  # fmt: skip
        num_frames = min(len(audio) // HOP_LENGTH, N_FRAMES)
        if num_frames < 2:
            return []
        clock = time.perf_counter()
        if mel is None:
            mel = self.backend.log_mel(audio, padding=self.window_padding(len(audio), min_frames))
            clock = self._account("mel", clock)
        window = self.encode(mel[:, :N_FRAMES], num_frames=num_frames, min_frames=min_frames)
        clock = self._account("encoder", clock)
        result = self._decode_at(window, _stream_options(prompt, prefix), 0.0)
        clock = self._account("decoder", clock)
        if not result.tokens or self._guarded(result):
            return []
        tokens, probs = _timed_tokens(prefix, result)
        words = self.word_timings(window, tokens, probs)
        self._account("decoder", clock)  # alignment is a decoder pass
        return _after_prefix(words, len(prefix))

    def continue_windows(self, requests: Sequence[WindowRequest]) -> list[list[Word]]:
        """Decode each window after its forced prefix (streaming); row ``i``: the timed words that
        follow request ``i``'s prefix, times relative to its audio.

        The prefix goes through the decoder in one pass, so an update costs decoder steps only
        for the new words. No timestamps are decoded (word times come from the alignment heads);
        a loop is cut where it starts. A request's ``mel``, when given, is its window's mel
        computed ahead: its audio followed by :meth:`window_padding` zeros.

        On a :class:`~whisper_engine.backend.BatchedBackend` the windows (of different streams)
        run together: one encoder launch for every window, one ``decode_greedy_batch`` for all
        their decoder steps, one ``alignment_matrix_batch`` for their alignments (reading the
        cross-attention K/V the decode left on the device) and one DTW for their word times. Row ``i`` gets
        what it gets in a batch of one, up to floating-point ties: the batched decoder works in
        float32 where decoding's masks and scores are float64, and batch shapes round differently
        (``tests/test_batching.py`` checks equality on dev speech). Any other backend runs them one
        after another, through :func:`~whisper_engine.decoding.decode`.
        """
        backend = self.backend
        if not isinstance(backend, BatchedBackend):
            return [self._continue_one(r) for r in requests]
        out: list[list[Word]] = [[] for _ in requests]
        rows = [i for i, r in enumerate(requests) if min(len(r.audio) // HOP_LENGTH, N_FRAMES) >= 2]
        if not rows:
            return out
        clock = started = time.perf_counter()
        num_frames = [min(len(requests[i].audio) // HOP_LENGTH, N_FRAMES) for i in rows]
        frames = [self._encoder_frames(n, requests[i].min_frames) for n, i in zip(num_frames, rows, strict=True)]
        if all(requests[i].mel is None for i in rows):  # the live path: mel and encoder on the device
            audios = [requests[i].audio for i in rows]
            paddings = [self.window_padding(len(requests[i].audio), requests[i].min_frames) for i in rows]
            features = backend.encode_audio_batch(audios, paddings, frames)
        else:
            mels = []
            for i, real, n in zip(rows, num_frames, frames, strict=True):
                r = requests[i]
                mel = r.mel
                if mel is None:
                    mel = backend.log_mel(r.audio, padding=self.window_padding(len(r.audio), r.min_frames))
                if mel.shape[-1] < n:  # (a mel from window_padding always covers them)
                    mel, _, _ = self._cut_window(mel, real, False, r.min_frames)
                mels.append(mel[:, :n])
            features = backend.encode_batch(mels)
        clock = self._account("encoder", clock)  # the mel's share cannot be told apart on the device
        marks = [started, clock]

        tok = self.tokenizer
        n_text_ctx = self.weights.dims.n_text_ctx
        starts = [
            initial_tokens(tok, _stream_options(requests[i].prompt, requests[i].prefix), n_text_ctx) for i in rows
        ]

        def looping(row: int, generated: list[int]) -> bool:
            initial, _, text_begin = starts[row]
            return loop_start([*initial, *generated], text_begin, len(initial), tok.timestamp_begin) is not None

        results = backend.decode_greedy_batch(
            features,
            [initial for initial, _, _ in starts],
            [min(n_text_ctx // 2, n_text_ctx - len(initial)) for initial, _, _ in starts],
            rules=backend.greedy_rules(tok),
            prefixed=[bool(requests[i].prefix) for i in rows],
            looping=looping,
        )
        marks.append(time.perf_counter())
        timed: list[tuple[int, int, list[int], list[float]]] = []  # (row, request, tokens, probs)
        for row, (i, greedy) in enumerate(zip(rows, results, strict=True)):
            result = _greedy_result(tok, greedy, starts[row])
            if not result.tokens or self._guarded(result):
                continue
            timed.append((row, i, *_timed_tokens(requests[i].prefix, result)))
        if timed:
            matrices = backend.alignment_matrix_batch(
                [features[row] for row, _, _, _ in timed],
                [alignment_tokens(tok, tokens) for _, _, tokens, _ in timed],
                [num_frames[row] for row, _, _, _ in timed],
                len(tok.sot_sequence()),
            )
            marks.append(time.perf_counter())
            timings = words_from_matrices(matrices, tok, [t for _, _, t, _ in timed], [p for _, _, _, p in timed])
            for (_, i, _, _), words in zip(timed, timings, strict=True):
                out[i] = _after_prefix(merge_punctuations(words), len(requests[i].prefix))
        self._account("decoder", clock)
        marks.append(time.perf_counter())
        with self._stage_lock:
            parts = ("launch", "decode", "align", "words") if len(marks) == 5 else ("launch", "decode", "words")
            for part, (a, b) in zip(parts, itertools.pairwise(marks), strict=True):
                self.batch_seconds[part] += b - a
        return out


@dataclass
class WindowRequest:
    """One window for :meth:`Engine.continue_windows`: the arguments of :meth:`Engine.continue_window`."""

    audio: np.ndarray
    prompt: list[int]
    prefix: list[int]
    min_frames: int | None = None
    mel: np.ndarray | None = None


def _stream_options(prompt: Sequence[int], prefix: Sequence[int]) -> DecodingOptions:
    """How streaming decodes a window: greedy after the prompt and the forced prefix, no
    timestamps, loops cut."""
    return DecodingOptions(without_timestamps=True, prompt=tuple(prompt), prefix=tuple(prefix), loop_guard=True)


def _greedy_result(tok: WhisperTokenizer, greedy: GreedyResult, start: tuple[list[int], int, int]) -> DecodingResult:
    """A batched decoder's row as :func:`whisper_engine.decoding.decode` reports it: a looping row is cut
    where its loop starts, as decode cuts it."""
    initial, _, text_begin = start
    tokens, logprobs = list(greedy.tokens), list(greedy.token_logprobs)
    sum_logprob = greedy.sum_logprob
    if greedy.looped:
        seq = [*initial, *tokens]
        cut = loop_start(seq, text_begin, len(initial), tok.timestamp_begin) or len(seq)
        tokens = seq[len(initial) : cut]
        logprobs = logprobs[: cut - len(initial)]
        sum_logprob = float(sum(logprobs))
    text = tok.decode(tokens)
    return DecodingResult(
        tokens=tokens,
        text=text,
        avg_logprob=sum_logprob / (len(tokens) + 1),
        sum_logprob=sum_logprob,
        no_speech_prob=greedy.no_speech_prob,
        temperature=0.0,
        compression_ratio=compression_ratio(text),
        token_logprobs=logprobs,
        looped=greedy.looped,
    )


def _timed_tokens(prefix: list[int], result: DecodingResult) -> tuple[list[int], list[float]]:
    """The tokens the alignment pass times (the forced prefix, then the decoded ones) and their
    probabilities (the prefix's count as certain)."""
    probs = [1.0] * len(prefix) + list(np.exp(result.token_logprobs[: len(result.tokens)]))
    return [*prefix, *result.tokens], probs


def _after_prefix(words: list[Word], prefix_tokens: int) -> list[Word]:
    """The words that follow a forced prefix of ``prefix_tokens`` tokens."""
    seen, new = 0, []
    for w in words:
        if seen >= prefix_tokens:
            new.append(w)
        seen += len(w.tokens)
    return new
