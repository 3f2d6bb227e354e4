"""Accuracy on real speech: the whole dev corpus, scored as the corpus README says."""

from __future__ import annotations

import jiwer
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from streamd.audio import load_audio
from streamd.vad import plan_windows, speech_regions
from whisper_engine.transcribe import TranscribeOptions, transcribe

from .conftest import reference

# faster-whisper 1.2.1 int8 with the same weights: 8.8% in the corpus README, 9.9% measured on
# this project's machine with its default options (BENCHMARKS.md). This guards what streamd
# transcribe measures with its default VAD (9.11%; 9.58% decoding whole files) against
# regressions; it is not yet under the README's 8.8% + 0.5.
BEAM1_BAR = 0.097


@pytest.fixture(scope="module")
def scored(engine, corpus):
    norm = EnglishTextNormalizer()
    refs, hyps = [], []
    for wav in corpus:
        audio = load_audio(wav)
        spans = plan_windows(speech_regions(audio))  # streamd transcribe's default: speech only
        result = transcribe(engine, audio, TranscribeOptions(beam_size=1, word_timestamps=False), spans=spans)
        refs.append(norm(reference(wav)))
        hyps.append(norm(result.text))
    return refs, hyps


def test_greedy_wer_on_the_dev_corpus(scored):
    refs, hyps = scored
    wer = jiwer.wer(refs, hyps)
    assert wer <= BEAM1_BAR, f"WER {wer:.3%}"


def test_no_file_loops_or_hallucinates(scored):
    """A loop or a hallucination on one file would hide in the corpus average: no hypothesis is
    much longer than its reference."""
    for ref, hyp in zip(*scored, strict=True):
        assert len(hyp.split()) <= 1.5 * len(ref.split()) + 3, (ref, hyp)
