"""The one interface every accelerator implements: mel, encoder, and a cached decoder; and the
batched interface a backend adds when it runs many windows in one launch.

Decoding policy (:mod:`whisper_engine.decoding`) and transcription (:mod:`whisper_engine.transcribe`)
only talk to :class:`Backend`, so the CPU, XDNA and CUDA backends run exactly the same search. Each
backend reports the device that really ran each stage in :attr:`Backend.devices`. The engine's
streaming path (``Engine.continue_windows``) takes a list of windows on every backend: a
:class:`BatchedBackend` gets them in one call of each batched method, any other backend one window
at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .weights import ModelDims, WhisperWeights

if TYPE_CHECKING:
    from .decoding import GreedyRules
    from .tokenizer import WhisperTokenizer

__all__ = ["STAGES", "Backend", "BatchedBackend", "DecoderSession", "GreedyResult"]

STAGES = ("mel", "encoder", "decoder")


class DecoderSession(ABC):
    """Decoder state for one window (or a batch of rows sharing it), cache kept on the device."""

    @abstractmethod
    def step(self, tokens: np.ndarray, positions: Sequence[int] = (-1,)) -> np.ndarray:
        """Feed ``tokens`` ``[B, n]`` after what was fed before; return float logits
        ``[B, len(positions), n_vocab]`` at the given positions of this call's tokens."""

    @abstractmethod
    def reorder(self, source: np.ndarray) -> None:
        """Row ``i`` continues the hypothesis of row ``source[i]`` (beam search)."""


class Backend(ABC):
    """One model on one set of devices."""

    name: str = "abstract"
    #: Windows one engine run takes: 1 here (the daemon runs one window per engine thread, each
    #: on its own core); a :class:`BatchedBackend` takes many streams' windows in one launch.
    max_batch: int = 1
    #: Whether the backend computes a streamed window's mel itself, from its audio (a batch's
    #: window mels in one launch on the device). Otherwise the daemon computes each stream's mel
    #: frames on the host as audio arrives, and hands a window its slice of them.
    mel_from_audio: bool = False

    def __init__(self, weights: WhisperWeights) -> None:
        self.weights = weights
        self.dims: ModelDims = weights.dims

    @property
    @abstractmethod
    def devices(self) -> dict[str, str]:
        """Which device ran each stage (``mel``, ``encoder``, ``decoder``), e.g. ``{"mel": "cpu"}``."""

    @abstractmethod
    def log_mel(self, audio: np.ndarray, padding: int = 0) -> np.ndarray:
        """Whisper log-mel ``[n_mels, frames]`` of 16 kHz mono float32 audio."""

    @abstractmethod
    def encode(self, mel: np.ndarray) -> object:
        """Encode a mel window ``[n_mels, even frames <= 3000]``; the result is opaque
        (it may stay on the device) and is passed back to :meth:`decoder`."""

    @abstractmethod
    def decoder(self, features: object, batch_size: int = 1) -> DecoderSession:
        """A fresh decoder session over ``features`` with ``batch_size`` rows."""

    @abstractmethod
    def alignment(self, features: object, tokens: np.ndarray) -> np.ndarray:
        """Word-timing input for one token sequence ``[n]``: the raw (pre-softmax) cross-attention
        scores of the model's alignment heads, ``[n_heads, n, T_audio]``."""

    def memory_report(self) -> dict[str, int]:
        """Device memory the backend holds, for ``/metrics`` and ``/healthz`` (byte counts by
        name); empty for a backend that keeps no device state of its own."""
        return {}


@dataclass
class GreedyResult:
    """One window's greedy decode from :meth:`BatchedBackend.decode_greedy_batch`."""

    tokens: list[int]  # generated, without the prompt and without eot
    sum_logprob: float  # over token_logprobs
    no_speech_prob: float  # NaN when the prompt holds no <|startoftranscript|>
    token_logprobs: list[float] = field(default_factory=list)  # each chosen token's, eot included if chosen
    looped: bool = False  # the loop guard stopped this row (its last token starts or completes a loop)


class BatchedBackend(Backend):
    """A backend that runs many windows in one launch (the GPU: a launch costs about the same
    for one window as for dozens). ``Engine.continue_windows`` calls these with every window of a
    scheduler batch; row ``i`` gets what the one-window path gives it, up to floating-point ties."""

    max_batch = 256

    @abstractmethod
    def encode_batch(self, mels: Sequence[np.ndarray]) -> list[object]:
        """:meth:`encode` of each mel window (even frame counts, any lengths), in order."""

    @abstractmethod
    def encode_audio_batch(
        self, audios: Sequence[np.ndarray], paddings: Sequence[int], frames: Sequence[int]
    ) -> list[object]:
        """:meth:`encode` of row ``i``'s mel (``log_mel(audios[i], paddings[i])`` cut to
        ``frames[i]``): the mel computed on the device (:attr:`mel_from_audio`)."""

    @abstractmethod
    def greedy_rules(self, tok: WhisperTokenizer) -> GreedyRules:
        """The token masks of streaming decoding for this model (built once, passed back)."""

    @abstractmethod
    def decode_greedy_batch(
        self,
        features_list: Sequence[object],
        prompts: Sequence[Sequence[int]],
        max_tokens: int | Sequence[int] = 224,
        *,
        rules: GreedyRules,
        prefixed: Sequence[bool] | None = None,
        looping: Callable[[int, list[int]], bool] | None = None,
    ) -> list[GreedyResult]:
        """Greedy-decode row ``i`` over ``features_list[i]`` after ``prompts[i]`` (its whole
        initial tokens, :meth:`GreedyRules.initial_tokens`), without timestamps, as
        :func:`whisper_engine.decoding.decode` would. ``prefixed[i]``: the prompt ends in a forced
        prefix (lifts the first-step blank suppression); ``looping(i, tokens)`` is the loop guard,
        asked after each new token, ``True`` stops row ``i`` (:attr:`GreedyResult.looped`)."""

    @abstractmethod
    def alignment_matrix_batch(
        self,
        features_list: Sequence[object],
        tokens_list: Sequence[np.ndarray],
        num_frames: Sequence[int],
        first_row: int,
    ) -> list[np.ndarray]:
        """:func:`whisper_engine.timing.alignment_matrix` of many windows at once."""
