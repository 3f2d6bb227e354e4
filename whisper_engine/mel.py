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


def _log10_mel(power: np.ndarray, n_mels: int) -> np.ndarray:
    spec = mel_filters(n_mels) @ power
    np.maximum(spec, np.float32(1e-10), out=spec)
    return np.log10(spec, out=spec)


def _frames_log10_mel(chunk: np.ndarray, n_mels: int) -> np.ndarray:
    """Unnormalised log10 mel of every whole 400-sample frame of ``chunk``, one every 160."""
    frames = np.lib.stride_tricks.sliding_window_view(chunk, N_FFT)[::HOP_LENGTH]
    spectrum = np.fft.rfft(frames * _hann(), axis=-1)
    return _log10_mel((spectrum.real**2 + spectrum.imag**2).T.astype(np.float32), n_mels)


def _normalise(log_spec: np.ndarray) -> np.ndarray:
    np.maximum(log_spec, log_spec.max() - np.float32(8.0), out=log_spec)
    log_spec += np.float32(4.0)
    log_spec /= np.float32(4.0)
    return log_spec


class StreamingMel:
    """Log-mel of a growing signal, computed as it arrives: each chunk costs only its own frames.

    For live streams, whose window is decoded again every half second: the frames of audio
    already seen are kept (unnormalised log10), so a window's mel is a slice of them, its last
    two frames (which see the window's end), silence, and Whisper's normalisation. Frames are
    indexed from the stream's first sample, so windows must start on a hop (160 samples).

    One difference from :func:`log_mel` on the window's audio: a window's first two frames see
    the real audio before it rather than a reflection of its start.
    """

    def __init__(self, n_mels: int = 80) -> None:
        self.n_mels = n_mels
        self._audio = np.zeros(0, np.float32)  # samples from self._audio_start on
        self._audio_start = 0
        self._frames = np.zeros((n_mels, 0), np.float32)  # frames from self._first on
        self._first = 0

    @property
    def received(self) -> int:
        return self._audio_start + len(self._audio)

    def _next_frame(self) -> int:
        return self._first + self._frames.shape[1]

    def push(self, samples: np.ndarray) -> None:
        """Take the next samples; computes every frame whose 400 samples have now all arrived."""
        self._audio = np.concatenate([self._audio, np.asarray(samples, np.float32)])
        pad = N_FFT // 2
        first, last = self._next_frame(), (self.received - pad) // HOP_LENGTH  # frames [first, last)
        if first < 2:  # frames 0 and 1 reach before the stream: reflect its start, as log_mel does
            if self.received > pad + 2 * HOP_LENGTH:
                head = _log10_mel(power_spectrogram(self._audio[: 2 * HOP_LENGTH + pad + 1])[:, :2], self.n_mels)
                self._frames = np.concatenate([self._frames, head[:, first:]], axis=1)
            first = self._next_frame()
        if last > first:
            lo = first * HOP_LENGTH - pad - self._audio_start
            hi = (last - 1) * HOP_LENGTH + pad - self._audio_start
            self._frames = np.concatenate([self._frames, _frames_log10_mel(self._audio[lo:hi], self.n_mels)], axis=1)
        # Keep only the audio the next frames (and a window's last frames) will need.
        keep = max(0, self._next_frame() * HOP_LENGTH - pad - self._audio_start - N_FFT)
        if keep:
            self._audio = self._audio[keep:]
            self._audio_start += keep

    def trim(self, start: int) -> None:
        """Frames before sample ``start`` will not be asked for again."""
        drop = min(start // HOP_LENGTH - self._first, self._frames.shape[1])
        if drop > 0:
            self._frames = self._frames[:, drop:]
            self._first += drop

    def reset(self, start: int) -> None:
        """Start over at sample ``start`` (a multiple of 160): after a silence nothing was pushed."""
        if start % HOP_LENGTH:
            raise ValueError(f"the cache must start on a hop of {HOP_LENGTH} samples, not at sample {start}")
        self._audio = np.zeros(0, np.float32)
        self._audio_start = start
        # The first two frames would need audio before ``start``: a window computes them itself.
        self._first = start // HOP_LENGTH + 2
        self._frames = np.zeros((self.n_mels, 0), np.float32)

    def window(self, start: int, audio: np.ndarray, padding: int) -> np.ndarray:
        """Normalised mel of ``audio`` (the stream from sample ``start``, a multiple of 160) followed
        by ``padding`` zero samples: ``[n_mels, (len(audio) + padding) // 160]``, as
        ``log_mel(audio, padding=padding)`` gives it (but for the first two frames, see above)."""
        if start % HOP_LENGTH:
            raise ValueError(f"a window must start on a hop of {HOP_LENGTH} samples, not at sample {start}")
        a = start // HOP_LENGTH
        total = (len(audio) + padding) // HOP_LENGTH
        pad = N_FFT // 2
        inside = min(max(0, (len(audio) - pad) // HOP_LENGTH + 1), total)  # frames within the audio
        head = min(max(0, self._first - a), inside)  # before the cache starts
        cached = head + max(0, min(inside, self._next_frame() - a) - head)
        edge_end = min(total, (len(audio) + pad) // HOP_LENGTH + 1)  # frames that see any audio
        out = np.full((self.n_mels, total), np.float32(np.log10(1e-10)), np.float32)
        if head:
            out[:, :head] = self._compute(audio, 0, head)
        if cached > head:
            out[:, head:cached] = self._frames[:, a + head - self._first : a + cached - self._first]
        if edge_end > cached:
            out[:, cached:edge_end] = self._compute(audio, cached, edge_end)
        return _normalise(out)

    def _compute(self, audio: np.ndarray, j0: int, j1: int) -> np.ndarray:
        """Frames ``[j0, j1)`` of ``audio`` on its own: reflected before it, zeros after it."""
        pad = N_FFT // 2
        lo = j0 * HOP_LENGTH - pad
        chunk = np.zeros((j1 - 1 - j0) * HOP_LENGTH + N_FFT, np.float32)
        src = audio[max(lo, 0) : max(lo + len(chunk), 0)]
        chunk[max(0, -lo) : max(0, -lo) + len(src)] = src
        if lo < 0 and len(audio) > -lo:
            chunk[:-lo] = audio[1 : 1 - lo][::-1]
        return _frames_log10_mel(chunk, self.n_mels)
