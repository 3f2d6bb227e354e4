"""Word timestamps: DTW and the median filter against plain references, and real alignments."""

from __future__ import annotations

import string

import numpy as np
import pytest

from streamd.audio import load_audio
from whisper_engine.timing import dtw, dtw_batch, median_filter
from whisper_engine.transcribe import TranscribeOptions, transcribe


def _dtw_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """openai/whisper's dtw_cpu recurrence, cell by cell."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf)
    cost[0, 0] = 0
    trace = -np.ones((n + 1, m + 1))
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = x[i - 1, j - 1] + c
            trace[i, j] = t
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        i, j = (i - 1, j - 1) if t == 0 else (i - 1, j) if t == 1 else (i, j - 1)
    path = np.array(path[::-1])
    return path[:, 0], path[:, 1]


@pytest.mark.parametrize("seed", range(12))
def test_dtw_matches_the_cell_by_cell_recurrence(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rng.integers(1, 25), rng.integers(1, 60)))
    ours, ref = dtw(x), _dtw_reference(x)
    assert np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1])


def test_a_batch_of_dtw_paths_equals_each_path_alone():
    """Windows of every shape in one batch (a 1x1, single rows and columns, wide and tall ones)
    each get the cell-by-cell path."""
    rng = np.random.default_rng(7)
    costs = [rng.normal(size=(rng.integers(1, 30), rng.integers(1, 80))) for _ in range(20)]
    costs += [np.ones((1, 1)), rng.normal(size=(1, 9)), rng.normal(size=(9, 1)), rng.normal(size=(40, 3))]
    for cost, (ours_i, ours_j) in zip(costs, dtw_batch(costs), strict=True):
        ref_i, ref_j = _dtw_reference(cost)
        assert np.array_equal(ours_i, ref_i) and np.array_equal(ours_j, ref_j), cost.shape
    assert dtw_batch([]) == []


def test_dtw_on_costs_full_of_ties_still_finds_a_minimum_cost_path():
    """Small integer costs tie everywhere; the path must still be monotonic, step by one, and
    cost what the cheapest path costs (openai/whisper's recurrence can leave the minimum there)."""
    rng = np.random.default_rng(3)
    costs = [rng.integers(0, 3, size=(rng.integers(1, 12), rng.integers(1, 30))).astype(float) for _ in range(40)]
    for cost, (path_i, path_j) in zip(costs, dtw_batch(costs), strict=True):
        n, m = cost.shape
        best = np.full((n + 1, m + 1), np.inf)
        best[0, 0] = 0
        for i in range(1, n + 1):
            for j in range(1, m + 1):
                best[i, j] = cost[i - 1, j - 1] + min(best[i - 1, j - 1], best[i - 1, j], best[i, j - 1])
        assert (path_i[0], path_j[0], path_i[-1], path_j[-1]) == (0, 0, n - 1, m - 1)
        steps = np.stack([np.diff(path_i), np.diff(path_j)], 1)
        assert set(map(tuple, steps.tolist())) <= {(1, 1), (1, 0), (0, 1)}
        assert cost[path_i, path_j].sum() == best[n, m]


@pytest.mark.parametrize("width", [3, 7])
def test_median_filter_matches_numpy_median(width):
    x = np.random.default_rng(0).normal(size=(3, 5, 40))
    pad = width // 2
    padded = np.pad(x, [(0, 0), (0, 0), (pad, pad)], mode="reflect")
    ref = np.median(np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1), axis=-1)
    np.testing.assert_allclose(median_filter(x, width), ref, atol=1e-6)


@pytest.fixture(scope="module")
def jfk_transcript(engine, jfk):
    return transcribe(engine, load_audio(jfk), TranscribeOptions(word_timestamps=True))


def test_words_cover_the_text_in_order(jfk_transcript):
    for seg in jfk_transcript.segments:
        assert "".join(w.word for w in seg.words).strip() == seg.text.strip()
        starts = [w.start for w in seg.words]
        assert starts == sorted(starts)
        for w in seg.words:
            assert seg.start <= w.start <= w.end <= seg.end
            assert 0.0 <= w.p <= 1.0


def test_word_times_agree_with_faster_whisper(engine, jfk, jfk_transcript):
    """An independent aligner on the same weights puts each word within ~0.2 s of ours."""
    faster_whisper = pytest.importorskip("faster_whisper")
    model = faster_whisper.WhisperModel(str(engine.weights.path), device="cpu", compute_type="float32", cpu_threads=2)
    segments, _ = model.transcribe(str(jfk), beam_size=1, word_timestamps=True, language="en")

    def bare(word: str) -> str:
        return word.strip().strip(string.punctuation).lower()

    theirs = [(bare(w.word), w.start) for s in segments for w in s.words]
    ours = [(bare(w.word), w.start) for s in jfk_transcript.segments for w in s.words]
    assert [w for w, _ in ours] == [w for w, _ in theirs]
    errors = np.abs(np.array([t for _, t in ours]) - np.array([t for _, t in theirs]))
    assert errors.mean() < 0.2, errors
