"""The CPU backend: the numpy reference graph of :mod:`whisper_engine.model`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..backend import STAGES, Backend, DecoderSession
from ..mel import log_mel
from ..model import Decoder, DecoderState, Encoder
from ..weights import WhisperWeights

__all__ = ["CpuBackend"]


@dataclass
class CpuFeatures:
    """Encoder output plus its cross-attention keys/values, computed on first use and shared by
    every decode of the window (fallbacks, beams, word alignment)."""

    x: np.ndarray  # [T_audio, d]
    cross: tuple[list[np.ndarray], list[np.ndarray]] | None = None


class _CpuSession(DecoderSession):
    def __init__(self, decoder: Decoder, state: DecoderState) -> None:
        self.decoder = decoder
        self.state = state

    def step(self, tokens: np.ndarray, positions: Sequence[int] = (-1,)) -> np.ndarray:
        hidden, _ = self.decoder.forward(self.state, np.asarray(tokens, dtype=np.int64))
        return self.decoder.logits(hidden[:, list(positions)])

    def reorder(self, source: np.ndarray) -> None:
        self.state.reorder(source)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, weights: WhisperWeights) -> None:
        super().__init__(weights)
        self.encoder = Encoder(weights)
        self.decoder_model = Decoder(weights)

    @property
    def devices(self) -> dict[str, str]:
        return dict.fromkeys(STAGES, "cpu")

    def log_mel(self, audio: np.ndarray, padding: int = 0) -> np.ndarray:
        return log_mel(audio, self.dims.n_mels, padding)

    def encode(self, mel: np.ndarray) -> CpuFeatures:
        return CpuFeatures(self.encoder(mel))

    def _cross(self, features: CpuFeatures) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if features.cross is None:
            features.cross = self.decoder_model.cross_kv(features.x)
        return features.cross

    def decoder(self, features: object, batch_size: int = 1) -> DecoderSession:
        assert isinstance(features, CpuFeatures)
        state = self.decoder_model.start(features.x, batch_size, self._cross(features))
        return _CpuSession(self.decoder_model, state)

    def alignment(self, features: object, tokens: np.ndarray) -> np.ndarray:
        assert isinstance(features, CpuFeatures)
        state = self.decoder_model.start(features.x, 1, self._cross(features))
        _, qk = self.decoder_model.forward(
            state, np.asarray(tokens, dtype=np.int64)[None], cross_qk_heads=self.weights.alignment_heads
        )
        return np.stack([s[0] for s in qk])
