"""The ``golden`` backend: the quantised NPU graph (:mod:`npu.quant`) run on the CPU through the
golden kernel models. It is what the ``xdna`` backend must reproduce exactly, and it measures
what quantisation costs in accuracy; it is not a fast path (numpy emulating int8 kernels)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from whisper_engine.backend import Backend, DecoderSession
from whisper_engine.weights import WhisperWeights

from .. import golden
from ..quant import QuantDecoder, QuantDecoderState, QuantModel

__all__ = ["GoldenBackend"]

DEVICE = "cpu (golden int8 model)"


@dataclass
class GoldenFeatures:
    x: np.ndarray  # encoder output [T, d]
    cross: list | None = None


class _GoldenSession(DecoderSession):
    def __init__(self, decoder: QuantDecoder, state: QuantDecoderState) -> None:
        self.decoder = decoder
        self.state = state

    def step(self, tokens: np.ndarray, positions: Sequence[int] = (-1,)) -> np.ndarray:
        hidden, _ = self.decoder.forward(self.state, np.asarray(tokens, np.int64))
        return self.decoder.logits(hidden[:, list(positions)])

    def reorder(self, source: np.ndarray) -> None:
        self.state.reorder(source)


class GoldenBackend(Backend):
    name = "golden"

    def __init__(self, weights: WhisperWeights) -> None:
        super().__init__(weights)
        self.model = QuantModel(weights)

    @property
    def devices(self) -> dict[str, str]:
        return {"mel": DEVICE, "encoder": DEVICE, "decoder": DEVICE}

    def log_mel(self, audio: np.ndarray, padding: int = 0) -> np.ndarray:
        return golden.mel.log_mel(audio, padding)

    def encode(self, mel: np.ndarray) -> GoldenFeatures:
        return GoldenFeatures(self.model.encoder(mel))

    def _cross(self, features: GoldenFeatures) -> list:
        if features.cross is None:
            features.cross = self.model.decoder.cross_kv(features.x)
        return features.cross

    def decoder(self, features: object, batch_size: int = 1) -> DecoderSession:
        assert isinstance(features, GoldenFeatures)
        return _GoldenSession(self.model.decoder, self.model.decoder.start(self._cross(features), batch_size))

    def alignment(self, features: object, tokens: np.ndarray) -> np.ndarray:
        assert isinstance(features, GoldenFeatures)
        decoder = self.model.decoder
        state = decoder.start(self._cross(features), 1)
        _, qk = decoder.forward(state, np.asarray(tokens, np.int64)[None], cross_qk_heads=self.weights.alignment_heads)
        return np.stack([s[0] for s in qk])
