"""The window guard: the decoder's own scores drop a window, rule by rule, and say which rule."""

from __future__ import annotations

from dataclasses import replace

from whisper_engine.decoding import DecodingResult, compression_ratio
from whisper_engine.guard import WindowGuard, longest_repeat


def result(text: str = " And so my fellow Americans.", no_speech: float = 0.05, logprob: float = -0.3):
    return DecodingResult(tokens=[1, 2, 3], text=text, avg_logprob=logprob, sum_logprob=3 * logprob,
                          no_speech_prob=no_speech, temperature=0.0,
                          compression_ratio=compression_ratio(text))  # fmt: skip


def test_speech_passes_every_rule():
    every = WindowGuard(certain_no_speech=0.9, logprob=-1.0, compression=2.4, repeats=3)
    assert every.check(result()) is None


def test_whispers_rule_needs_both_a_high_no_speech_and_an_unlikely_text():
    guard = WindowGuard()
    assert guard.check(result(no_speech=0.8, logprob=-1.4)) == "no_speech"
    assert guard.check(result(no_speech=0.8, logprob=-0.5)) is None  # a quiet but clear end of a sentence
    assert guard.check(result(no_speech=0.3, logprob=-1.4)) is None
    assert WindowGuard(no_speech=None).check(result(no_speech=0.8, logprob=-1.4)) is None


def test_each_optional_rule_fires_alone_and_is_named():
    base = WindowGuard(no_speech=None)
    assert replace(base, certain_no_speech=0.9).check(result(no_speech=0.95)) == "certain_no_speech"
    assert replace(base, logprob=-1.0).check(result(logprob=-1.2)) == "logprob"
    loop = " I'm going to go to the end of the video." * 6
    assert replace(base, compression=2.4).check(result(loop)) == "compression"
    assert replace(base, repeats=3).check(result(" Whoa! Whoa! Whoa!")) == "repeats"
    assert replace(base, repeats=3).check(result(" Whoa! Whoa!")) is None


def test_repeats_are_counted_without_case_or_punctuation():
    assert longest_repeat(" Thank you. Thank you.") == 1
    assert longest_repeat(" whoa, Whoa! WHOA. no") == 3
    assert longest_repeat("") == 0
