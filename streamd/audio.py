"""Reading audio files and converting any rate and channel count to 16 kHz mono float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["SAMPLE_RATE", "AudioError", "load_audio", "to_mono_16k"]

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
    """Decode WAV, FLAC or OGG (anything libsndfile reads) to 16 kHz mono float32 in [-1, 1]."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{_name(path)}: no such file")
    if path.is_dir():
        raise AudioError(f"{_name(path)}: is a directory, not an audio file")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioError(f"{_name(path)}: cannot decode audio ({reason})") from None
    except OSError as e:
        raise AudioError(f"{_name(path)}: {e.strerror or e}") from None
    return to_mono_16k(samples, rate)
