"""Decoding rules and search on the real model: timestamp grammar, suppression, loops, beams."""

from __future__ import annotations

import numpy as np
import pytest

from streamd.audio import load_audio
from whisper_engine.decoding import DecodingOptions, LogitRules, compression_ratio, decode, loop_start
from whisper_engine.mel import N_SAMPLES


@pytest.fixture(scope="module")
def jfk_window(engine, jfk):
    audio = load_audio(jfk)
    mel = engine.backend.log_mel(audio, padding=N_SAMPLES)
    return engine.encode(mel[:, :3000], num_frames=len(audio) // 160, pad_to_30s=True)


def _rules(engine, sample_begin=1, **kw):
    tok = engine.tokenizer
    opts = DecodingOptions(**kw)
    return LogitRules(tok, opts, engine.weights.suppress_tokens, sample_begin=sample_begin), tok


def test_first_token_must_be_an_early_timestamp(engine):
    rules, tok = _rules(engine)
    logits = np.zeros((1, engine.weights.dims.n_vocab))
    rules.apply(logits, [[tok.sot]])
    allowed = np.flatnonzero(np.isfinite(logits[0]))
    # <|0.00|> .. <|1.00|>: max_initial_timestamp is 1 s.
    assert allowed.min() == tok.timestamp_begin
    assert allowed.max() == tok.timestamp_begin + 50


def test_timestamps_come_in_pairs_and_never_decrease(engine):
    rules, tok = _rules(engine)
    ts = tok.timestamp_begin
    word = tok.encode(" hello")[0]
    logits = np.zeros((3, engine.weights.dims.n_vocab))
    logits[:, ts:] = -30.0  # text far likelier, so the "timestamps outweigh text" rule stays out of it
    seqs = [
        [tok.sot, ts + 10, word],  # open segment: text or a closing timestamp >= 0.20 s
        [tok.sot, ts + 10, word, ts + 40],  # closing timestamp just came: must be another or eot
        [tok.sot, ts + 10, word, ts + 40, ts + 40],  # pair closed: text must follow
    ]
    rules.apply(logits, seqs)
    row0 = np.isfinite(logits[0])
    assert row0[word] and not row0[ts + 9] and row0[ts + 11]
    row1 = np.isfinite(logits[1])
    assert not row1[word] and row1[tok.eot] and row1[ts + 40] and not row1[ts + 39]
    row2 = np.isfinite(logits[2])
    assert row2[word] and not row2[ts + 41]


def test_timestamp_is_forced_when_timestamps_outweigh_text(engine):
    rules, tok = _rules(engine)
    logits = np.zeros((1, engine.weights.dims.n_vocab))
    rules.apply(logits, [[tok.sot, tok.timestamp_begin, tok.encode(" hi")[0]]])
    assert np.all(logits[0, : tok.timestamp_begin] == -np.inf)


def test_suppressed_and_blank_tokens_are_masked(engine):
    rules, tok = _rules(engine, sample_begin=2, without_timestamps=True)
    logits = np.zeros((1, engine.weights.dims.n_vocab))
    rules.apply(logits, [[tok.sot, tok.no_timestamps]])
    for t in engine.weights.suppress_tokens:
        assert logits[0, t] == -np.inf
    assert logits[0, tok.encode(" ")[0]] == -np.inf  # blank at the start
    assert logits[0, tok.eot] == -np.inf
    assert np.isfinite(logits[0, tok.encode(" hello")[0]])
    assert np.all(logits[0, tok.timestamp_begin :] == -np.inf)


def test_timestamps_past_the_window_are_impossible(engine):
    rules, tok = _rules(engine, max_timestamp=2.0)
    logits = np.zeros((1, engine.weights.dims.n_vocab))
    rules.apply(logits, [[tok.sot, tok.timestamp_begin, tok.encode(" hi")[0]]])
    assert np.isfinite(logits[0, tok.timestamp_begin + 100])
    assert logits[0, tok.timestamp_begin + 101] == -np.inf


def test_loop_detection_finds_where_the_repeat_starts():
    ts = 50363
    a = [10, 11, 12, 13, 14]
    seq = [1, ts, *a, 10, 11, 12, 13]
    assert loop_start(seq, 1, 1, ts) == 7
    assert loop_start([1, ts, *a, 99, 98], 1, 1, ts) is None
    run = list(range(100, 108))
    assert loop_start([1, *run, 5, *run], 1, 1, ts) == 10
    assert loop_start([1, 7, 8, 30, 31, 32, 30, 31, 32], 1, 1, ts) == 6  # a phrase said twice
    assert loop_start([1, 7, 8, 30, 31, 30, 31], 1, 1, ts) is None  # two tokens twice: speech does that


def test_a_restart_of_the_forced_prefix_is_a_loop_cut_after_the_prefix():
    ts = 50363
    prefix = [10, 11, 12, 13]
    seq = [1, *prefix, 20, 10, 11, 12, 13]  # sampled: 20, then the prefix again
    assert loop_start(seq, 1, 5, ts) == 6
    assert loop_start([1, *prefix, 10, 11, 12, 13], 1, 5, ts) == 5  # all sampled text is the loop


def test_compression_ratio_flags_repetition():
    assert compression_ratio("the cat sat on the mat") < 1.5
    assert compression_ratio("ten of clubs " * 30) > 2.4
    assert compression_ratio("") == 0.0


def test_greedy_decodes_jfk_with_timestamps(engine, jfk_window):
    r = decode(engine.backend, jfk_window.features, engine.tokenizer, DecodingOptions())
    tok = engine.tokenizer
    assert r.text.strip().startswith("And so my fellow Americans")
    assert r.tokens[0] == tok.timestamp_begin
    assert r.tokens[-1] >= tok.timestamp_begin
    assert r.no_speech_prob < 0.2
    assert -1.0 < r.avg_logprob < 0


def test_beam_search_is_at_least_as_likely_as_greedy(engine, jfk_window):
    greedy = decode(engine.backend, jfk_window.features, engine.tokenizer, DecodingOptions())
    beam = decode(engine.backend, jfk_window.features, engine.tokenizer, DecodingOptions(beam_size=5))
    assert beam.text.strip().endswith("country.")
    assert beam.avg_logprob >= greedy.avg_logprob - 1e-6


def test_prompt_conditions_the_output(engine, jfk_window):
    tok = engine.tokenizer
    prompt = tuple(tok.encode(" ASK NOT WHAT YOUR COUNTRY CAN DO FOR YOU"))
    plain = decode(engine.backend, jfk_window.features, tok, DecodingOptions(without_timestamps=True))
    shouted = decode(engine.backend, jfk_window.features, tok, DecodingOptions(without_timestamps=True, prompt=prompt))
    assert plain.text != shouted.text
    assert all(t < tok.eot for t in shouted.tokens)


def test_silence_has_high_no_speech_probability(engine):
    window = engine.encode(engine.backend.log_mel(np.zeros(16000 * 3, np.float32), padding=N_SAMPLES)[:, :3000], 300)
    r, _ = engine.decode(window, DecodingOptions())
    assert r.no_speech_prob > 0.5
