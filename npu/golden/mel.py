"""The mel front end as an integer DFT plus a float32 mel/log stage (kernels/mel.cc, mlir/mel.py).

- :func:`frames_i16`: the host (or the design's DMA) cuts 16-bit audio into Whisper's 400-sample
  frames every 160 samples, reflect-padded and centred, last frame dropped.
- :func:`dft`: the Hann-windowed DFT as an int16 GEMM against :func:`dft_basis` (cos and -sin
  columns interleaved, Q15, window folded in), accumulated exactly in 64 bits, then
  shift-round-saturate by ``DFT_SHIFT`` (8) to int32: 2**22 times the float STFT (a shift of 15
  would round quiet bins too coarsely: 0.004 off the CPU features instead of 0.0003).
- :func:`mel_log`: power ``re*re + im*im`` in float32, the 80 Slaney filters as fixed-order sparse
  sums (weights pre-scaled by 2**-44), then log10 from a log2 table (error under 4e-6).

:func:`log_mel` chains them and applies Whisper's clamp and scaling (on the host: one max over
the window), for comparison with the CPU front end :func:`whisper_engine.mel.log_mel`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from whisper_engine.mel import HOP_LENGTH, N_FFT

from .numerics import rne, saturate, srs
from .tables import LOG2_BITS, log2_table, mel_filter_bank

__all__ = ["DFT_SHIFT", "N_BINS", "dft", "dft_basis", "frames_i16", "log_mel", "mel_log", "normalize"]

DFT_SHIFT = 8  # 2**15 (Q15 basis) * 2**15 (int16 audio) / 2**8: the int32 DFT is 2**22 x STFT
N_BINS = N_FFT // 2 + 1  # 201 frequency bins; the DFT output interleaves re, im: 402 columns
LOG10_2 = np.float32(0.30102999566398120)
FLOOR = np.float32(1e-10)


def frames_i16(audio: np.ndarray, padding: int = 0) -> np.ndarray:
    """float32 audio in [-1, 1] -> int16 frames ``[n_frames, 400]`` (``len // 160`` frames)."""
    audio = np.asarray(audio, np.float32)
    if padding:
        audio = np.pad(audio, (0, padding))
    pad = N_FFT // 2
    if len(audio) <= pad:
        audio = np.pad(audio, (0, pad + 1 - len(audio)))
    samples = saturate(rne(audio * np.float32(32768)), np.int16)
    padded = np.pad(samples, pad, mode="reflect")
    n_frames = (len(padded) - N_FFT) // HOP_LENGTH
    index = np.arange(n_frames)[:, None] * HOP_LENGTH + np.arange(N_FFT)[None, :]
    return padded[index]


@lru_cache(maxsize=1)
def dft_basis() -> np.ndarray:
    """int16 ``[400, 402]``: column ``2b`` is ``hann * cos``, ``2b + 1`` is ``-hann * sin`` of bin
    ``b``, in Q15 (saturated at 32767)."""
    t = np.arange(N_FFT)[:, None]
    b = np.arange(N_BINS)[None, :]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    angle = 2 * np.pi * ((t * b) % N_FFT) / N_FFT
    basis = np.empty((N_FFT, 2 * N_BINS), np.float64)
    basis[:, 0::2] = hann[:, None] * np.cos(angle)
    basis[:, 1::2] = -hann[:, None] * np.sin(angle)
    return saturate(np.rint(basis * 32768.0), np.int16)


def dft(frames: np.ndarray, basis: np.ndarray | None = None) -> np.ndarray:
    """int16 ``[F, 400]`` x int16 ``[400, 402]`` -> int32 ``[F, 402]``: ``srs(sum, DFT_SHIFT)``. The
    64-bit sums are exact (|sum| < 2**39) and computed through float64 BLAS (exact below 2**53)."""
    basis = dft_basis() if basis is None else basis
    if frames.dtype != np.int16 or basis.dtype != np.int16:
        raise TypeError("dft takes int16 frames and basis")
    exact = (frames.astype(np.float64) @ basis.astype(np.float64)).astype(np.int64)
    return srs(exact, DFT_SHIFT, np.int32)


def log10_positive(x: np.ndarray) -> np.ndarray:
    """log10 of normal positive float32, as the kernel computes it: exponent plus a table."""
    x = np.ascontiguousarray(x, np.float32)
    bits = x.view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.int32) - 127
    mantissa = bits & 0x7FFFFF
    index = (mantissa >> (23 - LOG2_BITS)).astype(np.int64)
    frac = (mantissa & ((1 << (23 - LOG2_BITS)) - 1)).astype(np.float32) * np.float32(1.0 / (1 << (23 - LOG2_BITS)))
    table = log2_table()
    here = table[index]
    step = table[index + 1] - here
    log2 = exponent.astype(np.float32) + (here + step * frac)
    return (log2 * LOG10_2).astype(np.float32)


def mel_log(spec: np.ndarray) -> np.ndarray:
    """int32 ``[F, 402]`` interleaved DFT -> float32 log10 mel ``[F, 80]`` (floored at 1e-10)."""
    re = spec[:, 0::2].astype(np.float32)
    im = spec[:, 1::2].astype(np.float32)
    power = re * re
    power += im * im
    first, count, weights = mel_filter_bank()
    mel = np.empty((spec.shape[0], len(first)), np.float32)
    offset = 0
    for j, (lo, n) in enumerate(zip(first, count, strict=True)):
        acc = np.zeros(spec.shape[0], np.float32)
        for i in range(n):
            acc += weights[offset + i] * power[:, lo + i]
        offset += n
        mel[:, j] = acc
    return log10_positive(np.maximum(mel, FLOOR))


def normalize(logmel: np.ndarray) -> np.ndarray:
    """Whisper's clamp and scaling of log10 mel ``[F, 80]`` -> ``[80, F]`` (one max per window)."""
    out = np.maximum(logmel.T, logmel.max() - np.float32(8.0))
    out += np.float32(4.0)
    out /= np.float32(4.0)
    return out


def log_mel(audio: np.ndarray, padding: int = 0) -> np.ndarray:
    """The whole NPU front end with Whisper's normalisation: ``[80, len // 160]`` float32."""
    return normalize(mel_log(dft(frames_i16(audio, padding))))
