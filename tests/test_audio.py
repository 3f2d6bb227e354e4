"""``streamd.audio``: decoding real files of any rate and channel count to 16 kHz mono float32."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from streamd.audio import SAMPLE_RATE, AudioError, load_audio, to_mono_16k
from streamd.container import ContainerStream

FRAME = SAMPLE_RATE // 100  # one 10 ms frame at 16 kHz


def _corr(a: np.ndarray, b: np.ndarray, lag: int = 0) -> float:
    """Normalised correlation of ``a`` and ``b`` shifted by ``lag`` samples, over their common length."""
    a = a[max(lag, 0) :].astype(np.float64)
    b = b[max(-lag, 0) :].astype(np.float64)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.fixture(scope="module")
def speech(jfk: Path) -> np.ndarray:
    x, rate = sf.read(str(jfk), dtype="float32")
    assert rate == SAMPLE_RATE and x.ndim == 1
    return x


def test_a_16k_mono_wav_loads_untouched_as_float32(jfk_wav: Path, jfk: Path, speech: np.ndarray) -> None:
    audio = load_audio(jfk_wav)
    info = sf.info(str(jfk_wav))
    assert audio.dtype == np.float32
    assert audio.ndim == 1
    assert len(audio) == info.frames == 11 * SAMPLE_RATE
    assert audio.flags["C_CONTIGUOUS"]
    # Already 16 kHz mono: the samples come through untouched, scaled to [-1, 1].
    np.testing.assert_array_equal(audio, speech)
    assert 0.1 < float(np.abs(audio).max()) <= 1.0
    # A str path works the same as a Path, and the lossless FLAC gives the same samples.
    np.testing.assert_array_equal(load_audio(str(jfk_wav)), audio)
    np.testing.assert_array_equal(load_audio(jfk), audio)


# (label, sample rate, channels, container, subtype, scipy up, scipy down, lossless)
ENCODINGS = [
    ("flac-44k1-stereo", 44100, 2, "FLAC", "PCM_16", 441, 160, True),
    ("ogg-8k-vorbis", 8000, 1, "OGG", "VORBIS", 1, 2, False),
    ("wav-48k-24bit", 48000, 1, "WAV", "PCM_24", 3, 1, True),
    ("wav-22k05-float", 22050, 1, "WAV", "FLOAT", 441, 320, True),
]


@pytest.mark.parametrize(
    ("rate", "channels", "container", "subtype", "up", "down", "lossless"),
    [e[1:] for e in ENCODINGS],
    ids=[e[0] for e in ENCODINGS],
)
def test_reencoded_speech_loads_back_to_16k(
    tmp_path: Path,
    speech: np.ndarray,
    rate: int,
    channels: int,
    container: str,
    subtype: str,
    up: int,
    down: int,
    lossless: bool,
) -> None:
    # Re-encode with scipy (not soxr, which the implementation uses) so the check is independent.
    y = resample_poly(speech, up, down).astype(np.float32)
    if channels == 2:
        y = np.stack([y, y], axis=1)
    path = tmp_path / f"speech.{container.lower()}"
    sf.write(str(path), y, rate, format=container, subtype=subtype)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (rate, channels, subtype)

    audio = load_audio(path)
    assert audio.dtype == np.float32
    assert audio.ndim == 1
    # Duration: within one 10 ms frame of the original, and of the file's own frame count.
    assert abs(len(audio) - len(speech)) <= FRAME
    assert abs(len(audio) - info.frames * SAMPLE_RATE / rate) <= FRAME
    assert float(np.abs(audio).max()) <= 1.0

    if lossless:
        # Same waveform, same level, no time shift.
        assert _corr(audio, speech) > 0.99
        lags = {lag: _corr(audio, speech, lag) for lag in range(-4, 5)}
        assert max(lags, key=lags.get) == 0, lags
        assert _rms(audio[: len(speech)]) == pytest.approx(_rms(speech), rel=0.02)
    else:
        # Lossy and band-limited to 4 kHz, but still recognisably the same speech.
        assert _corr(audio, speech) > 0.9
        assert _rms(audio[: len(speech)]) == pytest.approx(_rms(speech), rel=0.1)


def test_stereo_with_one_silent_channel_is_half_amplitude(tmp_path: Path, speech: np.ndarray) -> None:
    stereo = np.stack([speech, np.zeros_like(speech)], axis=1)
    path = tmp_path / "left_only.wav"
    sf.write(str(path), stereo, SAMPLE_RATE, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.shape == speech.shape
    np.testing.assert_allclose(audio, speech / 2, atol=1e-6)
    assert _rms(audio) == pytest.approx(_rms(speech) / 2, rel=1e-4)

    # Also through the resampler: a 44.1 kHz left-only file is half of the 44.1 kHz mono one.
    y = resample_poly(speech, 441, 160).astype(np.float32)
    sf.write(str(tmp_path / "mono44.wav"), y, 44100, subtype="FLOAT")
    sf.write(str(tmp_path / "left44.wav"), np.stack([np.zeros_like(y), y], axis=1), 44100, subtype="FLOAT")
    mono, left = load_audio(tmp_path / "mono44.wav"), load_audio(tmp_path / "left44.wav")
    assert len(left) == len(mono)
    np.testing.assert_allclose(left, mono / 2, atol=1e-5)


def test_resampler_keeps_speech_band_and_removes_what_16k_cannot_hold(tmp_path: Path) -> None:
    rate = 44100
    t = np.arange(rate) / rate  # 1 s
    low = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    high = (0.5 * np.sin(2 * np.pi * 10000 * t)).astype(np.float32)  # above the 8 kHz Nyquist of 16 kHz
    sf.write(str(tmp_path / "low.wav"), low, rate, subtype="FLOAT")
    sf.write(str(tmp_path / "high.wav"), high, rate, subtype="FLOAT")
    lo, hi = load_audio(tmp_path / "low.wav"), load_audio(tmp_path / "high.wav")
    assert len(lo) == len(hi) == SAMPLE_RATE
    inner = slice(FRAME, -FRAME)  # away from the filter's edges
    assert _rms(lo[inner]) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)
    expected = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
    assert _corr(lo[inner], expected[inner]) > 0.999
    # Naive decimation would alias 10 kHz to 6 kHz at full level; a proper low-pass removes it.
    assert _rms(hi[inner]) < 0.005


def test_to_mono_16k_averages_channels_and_resamples() -> None:
    x = np.stack([np.full(4800, 0.3), np.full(4800, -0.3), np.full(4800, 0.6)], axis=1)
    out = to_mono_16k(x, 16000)
    assert out.dtype == np.float32 and out.shape == (4800,)
    np.testing.assert_allclose(out, 0.2, atol=1e-6)

    out48 = to_mono_16k(x, 48000)
    assert out48.dtype == np.float32 and out48.shape == (1600,)
    np.testing.assert_allclose(out48[100:-100], 0.2, atol=1e-3)

    empty = to_mono_16k(np.zeros((0, 2), dtype=np.float32), 44100)
    assert empty.dtype == np.float32 and empty.shape == (0,)


def _missing(tmp: Path) -> Path:
    return tmp / "does_not_exist.wav"


def _directory(tmp: Path) -> Path:
    d = tmp / "folder.wav"
    d.mkdir()
    return d


def _empty(tmp: Path) -> Path:
    p = tmp / "empty.wav"
    p.write_bytes(b"")
    return p


def _text(tmp: Path) -> Path:
    p = tmp / "notes.wav"
    p.write_text("These are meeting notes, not audio.\nSecond line.\n", encoding="utf-8")
    return p


def _truncated_header(tmp: Path, jfk: Path) -> Path:
    p = tmp / "truncated.wav"
    p.write_bytes(jfk.read_bytes()[:20])  # cut inside the 'fmt ' chunk
    return p


def _header_without_data(tmp: Path, jfk: Path) -> Path:
    raw = jfk.read_bytes()
    assert raw[:4] == b"RIFF" and raw[8:16] == b"WAVEfmt "
    p = tmp / "no_data.wav"
    p.write_bytes(raw[:36])  # RIFF + complete 'fmt ' chunk, no 'data' chunk
    return p


BAD_FILES = {
    "missing": lambda tmp, jfk: _missing(tmp),
    "directory": lambda tmp, jfk: _directory(tmp),
    "empty": lambda tmp, jfk: _empty(tmp),
    "text-renamed-wav": lambda tmp, jfk: _text(tmp),
    "truncated-header": _truncated_header,
    "header-without-data": _header_without_data,
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_unreadable_files_raise_one_line_audio_error(tmp_path: Path, jfk_wav: Path, kind: str) -> None:
    path = BAD_FILES[kind](tmp_path, jfk_wav)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message and "\r" not in message
    assert len(message) > len(str(path)) + 5  # says why, not just the name
    # The same for a str path.
    with pytest.raises(AudioError, match="^" + re.escape(str(path))):
        load_audio(str(path))


# --- a container as it arrives (a browser's WebM/Opus over a live websocket) -------------------------


WEBM = Path(__file__).parent / "data" / "speech" / "dev_librispeech_1221-135766-0002.webm"


async def _stream(data: bytes, piece: int, stop_at: int | None = None):
    """``data`` into a ContainerStream ``piece`` bytes at a time; the stream and what came out."""
    stream, out = ContainerStream(), []

    async def take() -> None:
        async for block in stream.blocks():
            out.append(block)

    taking = asyncio.create_task(take())
    for i in range(0, len(data) if stop_at is None else stop_at, piece):
        stream.write(data[i : i + piece])
        await asyncio.sleep(0)
    return stream, out, taking


async def test_a_container_written_in_pieces_decodes_as_the_whole_file_does() -> None:
    stream, out, taking = await _stream(WEBM.read_bytes(), 977)
    await stream.settled()
    assert out, "nothing decoded before the end of the stream"
    stream.close()
    await taking
    whole = load_audio(WEBM)
    np.testing.assert_array_equal(np.concatenate(out), whole)
    assert stream.samples == len(whole)


async def test_a_dropped_client_stops_the_decoding_thread_and_garbage_is_one_error() -> None:
    data = WEBM.read_bytes()
    stream, _, taking = await _stream(data, 977, stop_at=len(data) // 2)
    stream.abort()
    stream._thread.join(5)
    assert not stream._thread.is_alive()
    taking.cancel()
    stream, _, taking = await _stream(b"not a container at all " * 400, 1000)
    stream.close()
    with pytest.raises(AudioError, match="cannot decode audio"):
        await taking
    small = ContainerStream(max_pending_bytes=10)
    with pytest.raises(AudioError, match="waiting to be decoded"):
        small.write(b"x" * 11)
    small.abort()
