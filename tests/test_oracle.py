"""The numpy engine against CTranslate2 (what faster-whisper runs) on the same weights.

CTranslate2 is a dev-only dependency: it is the independent implementation of the same graph.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamd.audio import load_audio
from whisper_engine.decoding import DecodingOptions, decode
from whisper_engine.mel import N_FRAMES, N_SAMPLES

ctranslate2 = pytest.importorskip("ctranslate2")


@pytest.fixture(scope="module")
def ct2_model(engine):
    return ctranslate2.models.Whisper(str(engine.weights.path), device="cpu", compute_type="float32", intra_threads=2)


@pytest.fixture(scope="module")
def padded_windows(engine, corpus):
    """First 30 s window of every dev file, padded as Whisper pads."""
    windows = []
    for wav in corpus:
        audio = load_audio(wav)
        mel = engine.backend.log_mel(audio, padding=N_SAMPLES)[:, :N_FRAMES]
        windows.append((wav.name, mel, min(len(audio) // 160, N_FRAMES)))
    return windows


def test_encoder_output_agrees(engine, ct2_model, padded_windows):
    worst = 0.0
    for _, mel, _ in padded_windows[:6]:
        ours = engine.backend.encode(mel).x
        theirs = np.array(
            ct2_model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None])), to_cpu=True)
        )[0]
        rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        worst = max(worst, rel)
    assert worst <= 1e-2, worst


def test_greedy_tokens_identical_on_nine_in_ten_files(engine, ct2_model, padded_windows):
    tok = engine.tokenizer
    same = []
    for name, mel, n_frames in padded_windows:
        window = engine.encode(mel, num_frames=n_frames, pad_to_30s=True)
        ours = decode(
            engine.backend,
            window.features,
            tok,
            DecodingOptions(),
            engine.weights.suppress_tokens,
            engine.weights.suppress_tokens_begin,
        )
        result = ct2_model.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None])),
            [tok.sot_sequence()],
            beam_size=1,
            suppress_blank=True,
            suppress_tokens=[-1],
            max_initial_timestamp_index=50,
            max_length=224,
            return_no_speech_prob=True,
        )[0]
        theirs = [t for t in result.sequences_ids[0] if t != tok.eot]
        same.append(ours.tokens == theirs)
        if ours.tokens == theirs:
            assert abs(ours.no_speech_prob - result.no_speech_prob) < 1e-2, name
    assert sum(same) >= 0.9 * len(same), f"{sum(same)}/{len(same)} identical"
