"""The log-mel front end against an independent librosa implementation of Whisper's recipe."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import soundfile as sf

from whisper_engine.mel import N_SAMPLES, log_mel, mel_filters

from .conftest import speech_file

RECORDINGS = [
    "dev_librispeech_1089-134686-0001",
    "dev_vctk_p287_004_noisy",
    "dev_vctk_p287_002_clean",
    "dev_librivox_sense_sensibility_0880",
]


def load(name: str) -> np.ndarray:
    audio, rate = sf.read(str(speech_file(name)), dtype="float32")
    assert rate == 16000 and audio.ndim == 1
    return audio


def reference_log_mel(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """openai/whisper's log_mel_spectrogram, rebuilt from librosa in float64."""
    stft = librosa.stft(
        audio.astype(np.float64), n_fft=400, hop_length=160, window="hann", center=True, pad_mode="reflect"
    )
    power = np.abs(stft[:, :-1]) ** 2
    mel = librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels, dtype=np.float64) @ power
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_librosa(n_mels: int) -> None:
    ours = mel_filters(n_mels)
    ref = librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels)
    assert ours.shape == ref.shape == (n_mels, 201)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-6
    assert (ours >= 0).all() and (ours.max(axis=1) > 0).all()  # no empty band


@pytest.mark.parametrize("name", RECORDINGS)
def test_log_mel_matches_librosa(name: str) -> None:
    audio = load(name)
    ours = log_mel(audio)
    ref = reference_log_mel(audio)
    assert ours.shape == ref.shape == (80, len(audio) // 160)
    assert ours.dtype == np.float32
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref).max() <= 1e-3
    # Speech, not a flat line: the dynamic range reaches the 8-decade clamp (2.0 after scaling).
    assert ours.max() - ours.min() == pytest.approx(2.0, abs=1e-3)


def test_log_mel_128_bands() -> None:
    audio = load(RECORDINGS[0])
    ours = log_mel(audio, n_mels=128)
    ref = reference_log_mel(audio, n_mels=128)
    assert ours.shape == (128, len(audio) // 160)
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize("name", RECORDINGS[:2])
def test_log_mel_padding(name: str) -> None:
    audio = load(name)
    plain = log_mel(audio)
    padded = log_mel(audio, padding=N_SAMPLES)
    assert padded.shape == (80, (len(audio) + N_SAMPLES) // 160)
    # Frames whose 400-sample window lies inside the audio see the same samples in both; the
    # max-clamp is the same as long as the loudest frame is not at the very end.
    same = (len(audio) - 200) // 160 + 1
    assert plain[:, :same].max() == plain.max() == padded.max()
    np.testing.assert_allclose(padded[:, :same], plain[:, :same], atol=1e-5)
    # Well past the audio, zeros: log10 floor clamped at max - 8, i.e. max - 2.0 after scaling.
    tail = padded[:, plain.shape[1] + 3 :]
    np.testing.assert_allclose(tail, padded.max() - 2.0, atol=1e-6)


def test_log_mel_silence_padded_to_30s() -> None:
    mel = log_mel(np.zeros(0, np.float32), padding=N_SAMPLES)
    assert mel.shape == (80, 3000)
    np.testing.assert_allclose(mel, -1.5, atol=1e-6)  # (log10(1e-10) + 4) / 4, 1e-10 in float32


@pytest.mark.parametrize("n", [0, 1, 100, 159, 199, 200])
def test_log_mel_tiny_inputs(n: int) -> None:
    audio = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    mel = log_mel(audio)
    assert mel.ndim == 2 and mel.shape[0] == 80
    assert mel.shape[1] in (n // 160, 1)  # at most one frame
    assert mel.dtype == np.float32
    assert np.isfinite(mel).all()
    if n == 0:
        np.testing.assert_allclose(mel, -1.5, atol=1e-6)
    else:
        assert mel.max() - mel.min() <= 2.0 + 1e-6
        assert mel.max() > -1.5  # some energy


def test_log_mel_tiny_silence() -> None:
    mel = log_mel(np.zeros(150, np.float32))
    assert mel.shape[0] == 80 and mel.shape[1] <= 1
    np.testing.assert_allclose(mel, -1.5, atol=1e-6)


def test_streaming_mel_gives_the_windows_log_mel(jfk):
    """Frames computed as 100 ms chunks arrive, sliced into windows as the daemon asks for them,
    equal log_mel of each window's audio; only a mid-stream window's first two frames differ
    (they see the real audio before the window instead of a reflection of its start)."""
    from streamd.audio import load_audio
    from whisper_engine.mel import StreamingMel

    audio = load_audio(jfk)
    mel = StreamingMel()
    mel.reset(16000)  # the stream's cache starts after a silence, on a hop
    checked = 0
    for end in range(16000 + 1600, len(audio), 1600):
        mel.push(audio[end - 1600 : end])
        if end % 8000:
            continue
        for start in (16000, 32000, 80000):
            if start + 3200 > end:
                continue
            window, padding = audio[start:end], 700 * 160
            expected = log_mel(window, padding=padding)
            got = mel.window(start, window, padding)
            assert got.shape == expected.shape
            skip = 0 if start == 16000 else 2
            np.testing.assert_allclose(got[:, skip:], expected[:, skip:], atol=1e-5)
            checked += 1
    mel.trim(80000)
    final = audio[80000:120000]  # a final window ends before the newest audio
    np.testing.assert_allclose(mel.window(80000, final, 1600)[:, 2:], log_mel(final, padding=1600)[:, 2:], atol=1e-5)
    assert checked > 20
    with pytest.raises(ValueError, match="hop"):
        mel.window(80001, final, 0)
