"""Cutting a window's tokens into segments and choosing where the next window starts."""

from __future__ import annotations

import numpy as np

from whisper_engine.transcribe import _split_segments, transcribe

TS = 50363  # <|0.00|>


def ts(seconds: float) -> int:
    return TS + round(seconds / 0.02)


def test_complete_pairs_become_segments_and_seeking_resumes_at_the_last_pair():
    tokens = [ts(0), 1, 2, ts(2.0), ts(2.0), 3, ts(4.5), ts(4.5), 4]  # the last segment is open
    pieces, next_seek = _split_segments(tokens, TS, offset=10.0, window_s=30.0)
    assert [(start, end) for start, end, _ in pieces] == [(10.0, 12.0), (12.0, 14.5)]
    assert [[tokens[i] for i in text] for _, _, text in pieces] == [[1, 2], [3]]
    assert next_seek == 450  # frames: the open segment is decoded again in the next window


def test_a_single_closing_timestamp_at_the_end_consumes_the_window():
    tokens = [ts(0), 1, ts(3.0), ts(3.0), 2, ts(29.0)]
    pieces, next_seek = _split_segments(tokens, TS, offset=0.0, window_s=30.0)
    assert [(s, e) for s, e, _ in pieces] == [(0.0, 3.0), (3.0, 29.0)]
    assert next_seek is None


def test_text_that_ends_long_before_the_window_does_is_decoded_again_from_there():
    tokens = [ts(0), 1, ts(3.0), ts(3.0), 2, ts(8.0)]
    _, next_seek = _split_segments(tokens, TS, offset=0.0, window_s=30.0)
    assert next_seek == 800


def test_no_timestamp_pairs_gives_one_segment():
    pieces, next_seek = _split_segments([ts(0), 1, 2, 3], TS, offset=5.0, window_s=12.0)
    assert [(s, e) for s, e, _ in pieces] == [(5.0, 17.0)]
    assert next_seek is None


def test_silence_gives_no_segments(engine):
    assert transcribe(engine, np.zeros(16000 * 4, np.float32)).segments == []
