"""Reading audio files and converting any rate and channel count to 16 kHz mono float32.

WAV, FLAC and OGG are read with libsndfile (``soundfile``); what it does not recognise (MP3,
M4A/MP4, WebM, Opus, ...) is decoded with FFmpeg through PyAV, whose wheel ships it. Either way
the samples are downmixed and resampled here, the same way, so a recording gives the same text
whatever it came in.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

__all__ = ["SAMPLE_RATE", "AudioError", "decode_audio", "load_audio", "to_mono_16k"]

SAMPLE_RATE = 16000


class AudioError(Exception):
    """An audio file is missing or cannot be decoded; ``str()`` is one line naming the file."""


def _name(path: Path) -> str:
    """The path on one line: control characters in a file name are shown escaped."""
    text = str(path)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Average channels (``[frames, channels]``) and resample to 16 kHz with soxr (high quality)."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    if sample_rate != SAMPLE_RATE and len(x):
        import soxr

        x = soxr.resample(x, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(x)


def load_audio(path: str | Path) -> np.ndarray:
    """Decode an audio file (any format libsndfile or FFmpeg reads) to 16 kHz mono float32 in [-1, 1]."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{_name(path)}: no such file")
    if path.is_dir():
        raise AudioError(f"{_name(path)}: is a directory, not an audio file")
    try:
        return _decode(str(path), _name(path))
    except OSError as e:
        raise AudioError(f"{_name(path)}: {e.strerror or e}") from None


def decode_audio(data: bytes, name: str = "upload") -> np.ndarray:
    """:func:`load_audio` of a file's bytes (an upload); errors name it ``name``."""
    if not data:
        raise AudioError(f"{name}: the file is empty")
    return _decode(data, name)


def _decode(source: str | bytes, name: str) -> np.ndarray:
    import soundfile as sf

    try:
        samples, rate = sf.read(source if isinstance(source, str) else io.BytesIO(source), dtype="float32",
                                always_2d=True)  # fmt: skip
    except sf.LibsndfileError as e:
        if "recognised" not in str(e) and "recognized" not in str(e):  # libsndfile's format, but broken
            raise AudioError(f"{name}: cannot decode audio ({_first_line(e)})") from None
        samples, rate = _decode_ffmpeg(source, name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{name}: cannot decode audio ({_first_line(e)})") from None
    return to_mono_16k(samples, rate)


def _decode_ffmpeg(source: str | bytes, name: str) -> tuple[np.ndarray, int]:
    """Every audio frame of the first audio stream as ``[frames, channels]`` float32, at its own rate."""
    import av

    try:
        with av.open(source if isinstance(source, str) else io.BytesIO(source), metadata_errors="ignore") as f:
            stream = next((s for s in f.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioError(f"{name}: no audio stream in the file")
            channels = stream.codec_context.channels or 1
            rate = stream.codec_context.sample_rate
            resampler = av.AudioResampler(format="flt", layout=stream.codec_context.layout, rate=rate)
            parts = [
                out.to_ndarray().reshape(-1, channels)
                for frame in f.decode(stream)
                for out in resampler.resample(frame)
            ]
            parts += [out.to_ndarray().reshape(-1, channels) for out in resampler.resample(None)]
    except av.FFmpegError as e:
        raise AudioError(f"{name}: cannot decode audio ({_first_line(e)})") from None
    if not rate:
        raise AudioError(f"{name}: the audio stream has no sample rate")
    samples = np.concatenate(parts) if parts else np.zeros((0, channels), np.float32)
    return samples, rate


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
