"""The one interface every accelerator implements: mel, encoder, and a cached decoder.

Decoding policy (:mod:`whisper_engine.decoding`) and transcription (:mod:`whisper_engine.transcribe`) only talk to
this interface, so the CPU, XDNA and CUDA backends run exactly the same search. Each backend
reports the device that really ran each stage in :attr:`Backend.devices`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from .weights import ModelDims, WhisperWeights

__all__ = ["STAGES", "Backend", "DecoderSession"]

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
    #: Whether the backend takes many windows at once (``encode_batch``, ``decode_greedy_batch``,
    #: ``alignment_batch``; see :class:`whisper_engine.backends.cuda.CudaBackend`). Where it does, the daemon
    #: decodes many streams' windows in one launch; elsewhere it runs one window per engine thread.
    supports_batching: bool = False

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
