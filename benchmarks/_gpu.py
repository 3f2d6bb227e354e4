"""Shared by the GPU benchmarks: the model on the cuda backend, and the engine's window policy
applied to many windows at once on the device."""

from __future__ import annotations

import math

import numpy as np

from whisper_engine.backends.cuda import CudaBackend
from whisper_engine.decoding import GreedyRules
from whisper_engine.engine import MIN_UNPADDED_FRAMES, UNPADDED_TAIL_FRAMES
from whisper_engine.mel import HOP_LENGTH, N_FRAMES, SAMPLE_RATE
from whisper_engine.tokenizer import WhisperTokenizer
from whisper_engine.weights import load_weights

TOKENS_PER_S = 8  # decode budget per second of audio: about twice fast English speech


def load(device: str, model: str | None = None) -> tuple[CudaBackend, WhisperTokenizer, GreedyRules]:
    weights = load_weights(model)
    tok = WhisperTokenizer(weights.path / "tokenizer.json", weights.dims.n_vocab)
    return CudaBackend(weights, device=device), tok, GreedyRules.from_tokenizer(tok, weights)


def window_mels(backend: CudaBackend, audios: list[np.ndarray], min_frames: int = MIN_UNPADDED_FRAMES) -> list:
    """Device mels of unpadded windows, as :meth:`whisper_engine.engine.Engine.encode` cuts them: the audio
    plus ``UNPADDED_TAIL_FRAMES`` of silence, at least ``min_frames``, at most 30 s, even."""
    frames, paddings = [], []
    for audio in audios:
        real = min(len(audio) // HOP_LENGTH, N_FRAMES)
        n = min(N_FRAMES, max(real + UNPADDED_TAIL_FRAMES, min_frames))
        frames.append(n + n % 2)
        paddings.append((frames[-1] - real + 1) * HOP_LENGTH)
    mels = backend.log_mel_batch([a[: N_FRAMES * HOP_LENGTH] for a in audios], paddings)
    return [m[:, :n] for m, n in zip(mels, frames, strict=True)]


def token_budget(audio: np.ndarray) -> int:
    return min(224, math.ceil(TOKENS_PER_S * len(audio) / SAMPLE_RATE) + 8)


def gpu_memory() -> tuple[int, int]:
    """(allocated, peak allocated) bytes on the current CUDA device; zeros elsewhere."""
    import torch

    if not torch.cuda.is_available():
        return 0, 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(backend: CudaBackend) -> None:
    import torch

    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
