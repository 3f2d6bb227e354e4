"""Shared fixtures: the real bundled model and real speech.

The speech the tests need is in the repository (``tests/data/speech``, FLAC, with references and
licences in ``tests/data/README.md``). Checks over the whole dev corpus use
``../shared/corpus/dev`` when it is there (CI lays it beside the clone) and skip, saying why,
when it is not.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent / "data"
SPEECH = DATA / "speech"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "dev"


def load_benchmark(name: str):
    """``benchmarks/NAME.py`` as a module (the folder holds scripts, not a package), with the
    folder on the path as running the script puts it there (the scripts share ``harness.py``)."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.asynccontextmanager
async def running(engine, **config):
    """A daemon in this process on a loopback port with these settings, shut down after the block."""
    from streamd.server import Daemon, ServerConfig

    d = Daemon(engine, ServerConfig(port=0, **config))
    await d.start()
    try:
        yield d
    finally:
        await d.shutdown()


def speech_file(name: str) -> Path:
    """A recording carried by the repository (``dev_jfk_inaugural_1961``, ...)."""
    path = SPEECH / f"{name}.flac"
    assert path.exists(), f"{path} is not in the repository's test audio"
    return path


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.wav"))


def reference(path: Path) -> str:
    return path.with_suffix(".txt").read_text(encoding="utf-8")


def need_corpus() -> list[Path]:
    """The whole dev corpus, or a skip that says why (a clone without ``../shared``)."""
    files = corpus_files()
    if not files:
        pytest.skip(f"corpus-wide check: the dev corpus is not at {CORPUS} (a clone without ../shared)")
    return files


@pytest.fixture(scope="session")
def corpus() -> list[Path]:
    return need_corpus()


@pytest.fixture(scope="session", autouse=True)
def no_transcript_store_by_default():
    """``streamd serve`` subprocesses keep no transcripts unless a test asks (``--retention-days``,
    ``--state-dir``): the tests reuse source ids, and a shared store would replay one test's
    sessions to another's viewers; nor should a test run write to the user's state directory."""
    saved = os.environ.get("STREAMD_RETENTION_DAYS")
    os.environ["STREAMD_RETENTION_DAYS"] = "0"
    yield
    if saved is None:
        os.environ.pop("STREAMD_RETENTION_DAYS", None)
    else:
        os.environ["STREAMD_RETENTION_DAYS"] = saved


@pytest.fixture(scope="session")
def engine():
    from whisper_engine.engine import Engine

    return Engine.load()


@pytest.fixture(scope="session")
def jfk() -> Path:
    return speech_file("dev_jfk_inaugural_1961")


@pytest.fixture(scope="session")
def jfk_wav(jfk, tmp_path_factory) -> Path:
    """The JFK recording as a 16-bit WAV (the repository keeps FLAC), for tests of WAV files."""
    import soundfile as sf

    samples, rate = sf.read(jfk, dtype="int16")
    path = tmp_path_factory.mktemp("wav") / "dev_jfk_inaugural_1961.wav"
    sf.write(path, samples, rate, subtype="PCM_16")
    path.with_suffix(".txt").write_text(reference(jfk), encoding="utf-8")
    return path


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
