"""Shared fixtures: the real bundled model and the real speech corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "dev"
DATA = Path(__file__).resolve().parent / "data"


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.wav"))


def reference(wav: Path) -> str:
    return wav.with_suffix(".txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def corpus() -> list[Path]:
    files = corpus_files()
    if not files:
        pytest.fail(f"no dev recordings under {CORPUS}: the corpus is part of the test setup")
    return files


@pytest.fixture(scope="session")
def engine():
    from npu.engine import Engine

    return Engine.load()


@pytest.fixture(scope="session")
def jfk() -> Path:
    return CORPUS / "dev_jfk_inaugural_1961.wav"


@pytest.fixture(scope="session")
def jfk_audio(jfk):
    """The JFK recording, 16 kHz mono float32."""
    from streamd.audio import load_audio

    return load_audio(jfk)


@pytest.fixture(scope="session")
def music():
    """8.8 s of acoustic guitar (no voice), 16 kHz mono float32: webrtcvad calls it speech."""
    from streamd.audio import load_audio

    return load_audio(DATA / "music_acoustic_guitar.flac")


@pytest.fixture(scope="session")
def pink_noise():
    """10 s of loud pink noise (as ``sox synth pinknoise vol 0.3``), 16 kHz mono float32."""
    rng = np.random.default_rng(7)
    n = 16000 * 10
    spectrum = np.fft.rfft(rng.normal(size=n))
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
    noise = np.fft.irfft(spectrum, n)
    return (0.3 * noise / np.abs(noise).max()).astype(np.float32)
