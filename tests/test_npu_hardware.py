"""On a real XDNA NPU (``-m npu``): skipped, saying why, without the device node, pyxrt or the
built artifacts (``STREAMD_XDNA_ARTIFACTS``, see mlir/README.md). Ready for the first run on a
meeting box; nothing here has run on hardware yet."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from npu.backends.golden import GoldenBackend
from whisper_engine.backends import xdna_unavailable
from whisper_engine.engine import Engine
from whisper_engine.transcribe import transcribe

from .conftest import speech_file

pytestmark = pytest.mark.npu


@pytest.fixture(scope="module")
def npu_backend(engine):
    why = xdna_unavailable()
    if why:
        pytest.skip(f"no NPU to run on: {why}")
    from npu.backends.xdna import XdnaBackend

    return XdnaBackend(engine.weights)


def test_npu_mel_and_encoder_against_the_golden_model(npu_backend, engine):
    """The AIE2 vector paths are meant to follow the golden numerics exactly; if the hardware's
    float units round differently this shows by how much (see kernels/README.md)."""
    audio, _ = sf.read(speech_file("dev_jfk_inaugural_1961"), dtype="float32")
    golden = GoldenBackend(engine.weights)
    mel = npu_backend.log_mel(audio)
    want_mel = golden.log_mel(audio)
    print("mel max |diff|:", float(np.abs(mel - want_mel).max()))
    got = npu_backend.read(npu_backend.encode(want_mel[:, :1000]).x).reshape(500, -1)
    want = golden.encode(want_mel[:, :1000]).x
    print("encoder max |diff|:", float(np.abs(got - want).max()))
    assert np.allclose(mel, want_mel, atol=1e-3)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_npu_transcript_matches_the_golden_text(npu_backend, engine):
    audio, _ = sf.read(speech_file("dev_librivox_sense_sensibility_0870"), dtype="float32")
    got = transcribe(Engine(engine.weights, npu_backend, engine.tokenizer), audio).text
    want = transcribe(Engine(engine.weights, GoldenBackend(engine.weights), engine.tokenizer), audio).text
    assert got == want
