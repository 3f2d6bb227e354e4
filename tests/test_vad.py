"""The VAD gate, sans I/O: real speech framed by real silence, fed in odd chunk sizes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from streamd.audio import load_audio
from streamd.vad import VadConfig, VadGate, detector_cpu_seconds, plan_windows, speech_regions


@pytest.fixture(scope="module")
def padded_speech(jfk):
    speech = load_audio(jfk)
    silence = np.zeros(3 * 16000, np.float32)
    return np.concatenate([silence, speech, silence]), len(speech) / 16000


def test_silence_is_not_speech():
    assert speech_regions(np.zeros(16000 * 5, np.float32)) == []
    quiet_noise = np.random.default_rng(0).normal(0, 1e-4, 16000 * 5).astype(np.float32)
    assert speech_regions(quiet_noise) == []


def test_speech_region_has_pre_roll_and_covers_the_words(padded_speech):
    audio, speech_s = padded_speech
    regions = speech_regions(audio, VadConfig(hangover_s=0.5, pre_roll_s=0.3))
    assert regions, "no speech found in a dev recording"
    first_start, last_end = regions[0][0], regions[-1][1]
    # JFK's first word starts about 0.3 s into the recording, which itself starts at 3.0 s.
    assert 2.5 <= first_start <= 3.4
    assert 3.0 + speech_s - 1.5 <= last_end <= 3.0 + speech_s + 1.0
    for (_, end), (start, _) in itertools.pairwise(regions):
        assert end <= start


def test_chunk_size_does_not_change_the_decisions(padded_speech):
    audio, _ = padded_speech
    whole = speech_regions(audio)
    gate = VadGate()
    rng = np.random.default_rng(1)
    events, i = [], 0
    while i < len(audio):
        n = int(rng.integers(1, 9000))
        events += gate.feed(audio[i : i + n])
        i += n
    last = gate.flush()
    closed = {(r.start, r.end) for r in events if r.end is not None}
    if last is not None:
        closed.add((last.start, last.end))
    assert sorted(closed) == whole
    assert gate.time == pytest.approx(len(audio) // 512 * 0.032)


def test_open_region_is_reported_before_it_closes(padded_speech):
    audio, _ = padded_speech
    gate = VadGate()
    opened = gate.feed(audio[: 5 * 16000])
    assert len(opened) == 1 and opened[0].end is None and gate.in_speech


def test_config_is_validated():
    with pytest.raises(ValueError, match="aggressiveness"):
        VadConfig(aggressiveness=4)
    with pytest.raises(ValueError, match="10, 20 or 30"):
        VadConfig(frame_ms=25)
    with pytest.raises(ValueError, match="detector"):
        VadConfig(detector="pyannote")
    with pytest.raises(ValueError, match="threshold"):
        VadConfig(threshold=1.5)
    with pytest.raises(ValueError, match="neg_threshold"):
        VadConfig(threshold=0.4, neg_threshold=0.6)
    assert VadConfig(threshold=0.6).neg_threshold == pytest.approx(0.45)


def test_music_wakes_webrtcvad_but_is_not_speech(music):
    """webrtcvad alone calls the guitar speech; the neural detector rejects it, and says so."""
    assert speech_regions(music, VadConfig(detector="off")), "the first stage no longer hears the guitar"
    gate = VadGate()
    assert gate.feed(music) == [] and gate.flush() is None
    assert gate.candidates >= 1 and gate.rejected == gate.candidates


def test_loud_noise_is_not_speech(pink_noise):
    assert speech_regions(pink_noise, VadConfig(detector="off")), "the first stage no longer hears the noise"
    assert speech_regions(pink_noise) == []


def test_speech_under_music_and_noise_is_still_speech(jfk_audio, music, pink_noise):
    """JFK with the guitar and pink noise under him (each 10 dB below the speech): found, whole."""
    speech = np.concatenate([np.zeros(16000, np.float32), jfk_audio])
    power = float(np.mean(jfk_audio**2))
    bed = np.resize(music, len(speech)) + np.resize(pink_noise, len(speech))
    mixed = speech + bed * np.sqrt(power / 10 / float(np.mean(bed**2)))
    regions = speech_regions(mixed)
    assert regions and regions[0][0] <= 1.3  # JFK's first word is 0.3 s in: its onset is kept
    covered = sum(e - s for s, e in regions)
    assert covered >= 0.85 * len(jfk_audio) / 16000


def test_the_detector_sleeps_through_silence_and_costs_nothing_there(jfk_audio):
    gate = VadGate()
    gate.feed(jfk_audio)
    gate.feed(np.zeros(16000 * 12, np.float32))  # past the detector's 10 s stay-awake
    spent, judged = detector_cpu_seconds()
    gate.feed(np.zeros(16000 * 30, np.float32))
    assert detector_cpu_seconds() == (spent, judged)
    assert not gate.in_speech


def test_off_is_webrtcvad_alone(music):
    before = detector_cpu_seconds()
    gate = VadGate(VadConfig(detector="off"))
    assert gate.feed(music)[0].end is None  # the guitar opens a region at once
    gate.flush()
    assert detector_cpu_seconds() == before and gate.rejected == 0 and gate.candidates >= 1


def test_windows_merge_close_regions_up_to_the_limit():
    regions = [(0.0, 5.0), (5.5, 12.0), (12.4, 29.0), (29.5, 40.0), (45.0, 47.0)]
    assert plan_windows(regions, max_s=30.0, max_gap_s=2.0) == [(0.0, 29.0), (29.5, 40.0), (45.0, 47.0)]
    assert plan_windows([(0.0, 70.0)]) == [(0.0, 70.0)]  # a long region is left to seeking
    assert plan_windows([]) == []


def test_speech_right_after_music_keeps_its_first_words(music, jfk_audio):
    """Having heard the guitar, Silero rises a second late on JFK; the region still starts
    before his first word (0.3 s into his recording), where webrtcvad heard the sound begin."""
    audio = np.concatenate([music, np.zeros(8000, np.float32), jfk_audio])
    first_word = (len(music) + 8000) / 16000 + 0.3
    regions = speech_regions(audio)
    assert regions and first_word - 0.5 <= regions[0][0] <= first_word - 0.05
