"""Whisper's log-mel front end in numpy: 25 ms Hann frames every 10 ms, 80 Slaney mel bands.

Matches openai/whisper's ``log_mel_spectrogram``: a centred STFT with reflect padding
(n_fft 400, hop 160), power spectrum, Slaney-normalised mel filters, log10 clamped at 1e-10 and
at the maximum minus 8, then ``(x + 4) / 4``. The last STFT frame is dropped, as Whisper does.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["CHUNK_SECONDS", "HOP_LENGTH", "N_FFT", "N_FRAMES", "N_SAMPLES", "SAMPLE_RATE", "log_mel", "mel_filters"]

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in a full window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a full window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
SILENT_LOG_MEL = -1.5  # log_mel of digital silence: (log10(1e-10) + 4) / 4


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    mels = f / f_sp
    log_region = f >= min_log_hz
    return np.where(log_region, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular Slaney-normalised mel filters, ``[n_mels, n_fft // 2 + 1]`` float32 (librosa's
    ``filters.mel(sr, n_fft, n_mels)`` defaults, which Whisper's tables were made with)."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_points = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    return weights.astype(np.float32)


@lru_cache(maxsize=1)
def _hann(n: int = N_FFT) -> np.ndarray:
    # Periodic Hann, as torch.hann_window(n) gives.
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def power_spectrogram(audio: np.ndarray, block_frames: int = 1000) -> np.ndarray:
    """``|STFT|^2`` of 16 kHz mono audio, ``[n_fft // 2 + 1, n_frames]`` float32, last frame dropped.

    Computed ``block_frames`` at a time in single precision, so a long file costs its output
    and one block of temporaries rather than several float64 copies of the whole STFT.
    """
    audio = np.asarray(audio, dtype=np.float32)
    pad = N_FFT // 2
    if len(audio) <= pad:
        # Reflect padding needs more samples than the pad; silence-pad tiny inputs first.
        audio = np.pad(audio, (0, pad + 1 - len(audio)))
    padded = np.pad(audio, pad, mode="reflect")
    n_frames = (len(padded) - N_FFT) // HOP_LENGTH  # one fewer than the STFT has: Whisper drops it
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, N_FFT), strides=(padded.strides[0] * HOP_LENGTH, padded.strides[0])
    )
    out = np.empty((N_FFT // 2 + 1, n_frames), np.float32)
    window = _hann()
    for i in range(0, n_frames, block_frames):
        spectrum = np.fft.rfft(frames[i : i + block_frames] * window, axis=-1)
        out[:, i : i + block_frames] = (spectrum.real**2 + spectrum.imag**2).T
    return out


def log_mel(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """Whisper's normalised log-mel spectrogram, ``[n_mels, len(audio) // 160]`` float32.

    ``padding`` appends that many zero samples first (Whisper pads with 30 s before seeking).
    """
    audio = np.asarray(audio, dtype=np.float32)
    if padding:
        audio = np.pad(audio, (0, padding))
    log_spec = mel_filters(n_mels) @ power_spectrogram(audio)
    np.maximum(log_spec, np.float32(1e-10), out=log_spec)
    np.log10(log_spec, out=log_spec)
    np.maximum(log_spec, log_spec.max() - np.float32(8.0), out=log_spec)
    log_spec += np.float32(4.0)
    log_spec /= np.float32(4.0)
    return log_spec
