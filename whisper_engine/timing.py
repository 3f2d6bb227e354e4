"""Word timestamps from the cross-attention of the model's alignment heads, aligned with DTW.

The decoder is re-run once over a window's text tokens, capturing the raw cross-attention
scores of the heads listed in the model's files (``alignment_heads``). Those are softmaxed over
time, standardised per head, median filtered, averaged, and a monotonic path through
``-attention`` (dynamic time warping) maps every token to an audio frame. A word starts where its
first token's path enters a new frame.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .backend import Backend
from .tokenizer import WhisperTokenizer

__all__ = [
    "Word",
    "alignment_matrix",
    "alignment_tokens",
    "dtw",
    "dtw_batch",
    "find_alignment",
    "median_filter",
    "merge_punctuations",
    "words_from_matrices",
    "words_from_matrix",
    "words_from_scores",
]

TOKENS_PER_SECOND = 50  # encoder positions per second of audio
# Paths walk back one numpy step per cell for the whole batch from this many windows on, and
# cell by cell in Python below it: a numpy step costs about what 16 Python steps do (measured:
# 256 windows walk back in 11 ms at once against 64 ms one by one; one window in 0.25 ms by
# hand against 4 ms in numpy).
VECTOR_WALK_FROM = 16
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"


@dataclass
class Word:
    """A word and when it was said: seconds relative to its window (to the recording once
    :mod:`whisper_engine.transcribe` places it), the mean probability of its tokens as the decoder
    chose them, and the tokens (which a forced prefix is counted in)."""

    word: str
    start: float
    end: float
    p: float
    tokens: list[int] = field(default_factory=list)


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window of odd ``width`` along the last axis, reflect-padded.

    Bubble passes over ``width`` shifted copies: after ``width // 2 + 1`` passes the upper half
    is sorted and the middle element is the median. For width 7 this is about 10x faster than
    ``np.median`` over a sliding view, and needs no ``[..., width]`` copy.
    """
    half = width // 2
    n = x.shape[-1]
    if n <= half:
        return x
    padded = np.pad(x.astype(np.float32), [(0, 0)] * (x.ndim - 1) + [(half, half)], mode="reflect")
    cols = [padded[..., k : k + n].copy() for k in range(width)]
    for i in range(half + 1):
        for j in range(width - 1 - i):
            low = np.minimum(cols[j], cols[j + 1])
            np.maximum(cols[j], cols[j + 1], out=cols[j + 1])
            cols[j] = low
    return cols[width - 1 - half]


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic minimum-cost path through ``cost`` ``[N, M]`` from (0, 0) to (N-1, M-1).

    Steps are diagonal, down (next token, same frame) or right (same token, next frame); where
    two steps cost the same, right wins, then diagonal. On real-valued costs (no exact ties) this
    is the path openai/whisper's ``dtw_cpu`` finds; on exact ties that one can leave the minimum
    (it steps right whenever diagonal and down tie, whatever right costs), this one never does.
    Each row is one vectorised min-plus scan: O(N) numpy calls instead of O(N*M) Python steps.
    Returns the token indices and frame indices of the path: :func:`dtw_batch` of one.
    """
    return dtw_batch([cost])[0]


def dtw_batch(costs: Sequence[np.ndarray], group: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`dtw` of many cost matrices (any shapes) at once: windows of similar shape scan
    their rows together, ``group`` at a time (padding a short window to a long one would cost
    more than it saves), and every path walks back at once, so a batch costs far fewer numpy
    calls than one DTW per window. A cell never depends on cells right of it or below it, so
    padding changes none of a window's cells: each path is the one it gets alone."""
    if not costs:
        return []
    shapes = np.array([c.shape for c in costs])
    if shapes.min() < 1:
        raise ValueError(f"every cost matrix needs a row and a column, got shapes {shapes.tolist()}")
    b, (n, m) = len(costs), shapes.max(0)
    trace = np.full((b, n + 1, m + 1), 2, dtype=np.int8)  # 2: right (row 0), 1: down (column 0)
    trace[:, 1:, 0] = 1
    order = np.lexsort((shapes[:, 1], shapes[:, 0]))
    for first in range(0, b, group):
        rows = order[first : first + group]
        _scan(trace, rows, [costs[k] for k in rows])
    if b < VECTOR_WALK_FROM:
        return [_walk_back(trace[k], *shapes[k]) for k in range(b)]
    # Walk every path back from its own corner at once; a finished one stays at (0, 0).
    i, j = shapes[:, 0].copy(), shapes[:, 1].copy()
    steps = int(shapes.sum(1).max())
    path_i = np.zeros((b, steps), dtype=np.int64)
    path_j = np.zeros_like(path_i)
    every = np.arange(b)
    for k in range(steps):
        path_i[:, k], path_j[:, k] = i - 1, j - 1
        step = trace[every, i, j]
        live = (i > 0) | (j > 0)
        i = i - (live & (step != 2))
        j = j - (live & (step != 1))
    out = []
    for k in range(b):
        length = _path_length(path_i[k], path_j[k])
        out.append((path_i[k, :length][::-1].copy(), path_j[k, :length][::-1].copy()))
    return out


def _walk_back(trace: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """One path, walked back from ``(n, m)`` step by step."""
    i, j = int(n), int(m)
    path_i: list[int] = []
    path_j: list[int] = []
    while i > 0 or j > 0:
        path_i.append(i - 1)
        path_j.append(j - 1)
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(path_i[::-1]), np.array(path_j[::-1])


def _scan(trace: np.ndarray, rows: np.ndarray, costs: list[np.ndarray]) -> None:
    """Fill ``trace[rows]`` with the steps of the cheapest paths through ``costs`` (one window
    per row of ``rows``), one min-plus scan per matrix row for all of them."""
    g = len(costs)
    n, m = max(c.shape[0] for c in costs), max(c.shape[1] for c in costs)
    cost = np.zeros((g, n, m))
    for k, c in enumerate(costs):
        cost[k, : c.shape[0], : c.shape[1]] = c
    acc = np.full((2, g, m + 1), np.inf)  # rows i - 1 and i of the accumulated cost, in turn
    acc[0, :, 0] = 0.0
    for i in range(1, n + 1):
        prev, cur = acc[(i - 1) % 2], acc[i % 2]
        cur[:, 0] = np.inf
        x = cost[:, i - 1]
        diag, up = prev[:, :-1], prev[:, 1:]
        best = np.minimum(diag, up)
        # row[j] = x[j] + min(best[j], row[j-1]): a min-plus scan, solved with prefix sums.
        prefix = np.cumsum(x, axis=1)
        np.minimum.accumulate(best - (prefix - x), axis=1, out=cur[:, 1:])
        cur[:, 1:] += prefix
        left = cur[:, :-1]
        t = (up < diag).view(np.int8)
        t[left <= best] = 2
        trace[rows, i, 1 : m + 1] = t


def _path_length(path_i: np.ndarray, path_j: np.ndarray) -> int:
    """Steps of a walked-back path: up to its first (-1, -1), the cell before (0, 0)."""
    done = np.flatnonzero((path_i < 0) & (path_j < 0))
    return int(done[0]) if done.size else len(path_i)


def alignment_tokens(tok: WhisperTokenizer, text_tokens: list[int]) -> np.ndarray:
    """The token row the alignment pass runs: start of transcript, the text, eot."""
    return np.array([*tok.sot_sequence(), tok.no_timestamps, *text_tokens, tok.eot], dtype=np.int64)


def find_alignment(
    backend: Backend,
    features: object,
    tok: WhisperTokenizer,
    text_tokens: list[int],
    token_probs: list[float],
    num_frames: int,
    medfilt_width: int = 7,
) -> list[Word]:
    """Word timings, relative to the window start, of ``text_tokens`` decoded from ``features``.

    ``token_probs`` are the tokens' probabilities (a word's is the mean of its tokens');
    ``num_frames`` is the number of mel frames of real audio in the window (padding excluded).
    """
    if not text_tokens:
        return []
    if len(token_probs) != len(text_tokens):
        raise ValueError(f"{len(token_probs)} probabilities for {len(text_tokens)} tokens")
    qk = backend.alignment(features, alignment_tokens(tok, text_tokens))
    return words_from_scores(qk, tok, text_tokens, token_probs, num_frames, medfilt_width)


def alignment_matrix(qk: np.ndarray, num_frames: int, first_row: int, medfilt_width: int = 7) -> np.ndarray:
    """The DTW cost's negation from the alignment heads' scores ``qk`` ``[heads, tokens, T]``:
    softmax over the window's real frames, standardised over tokens per head, median filtered
    along time, averaged over heads; rows ``first_row:-1`` (those that predict each text token and
    eot), columns of the real audio. (``CudaBackend.alignment_matrix_batch`` computes the same for
    many windows on the device.)"""
    n_audio = max(1, min(num_frames // 2, qk.shape[-1]))
    weights = qk[:, :, :n_audio].astype(np.float32)
    weights -= weights.max(-1, keepdims=True)
    np.exp(weights, out=weights)
    weights /= weights.sum(-1, keepdims=True)
    mean = weights.mean(-2, keepdims=True)
    std = weights.std(-2, keepdims=True)
    weights = (weights - mean) / np.maximum(std, 1e-10)
    weights = median_filter(weights, medfilt_width)
    return weights.mean(0)[first_row:-1]


def words_from_scores(
    qk: np.ndarray,
    tok: WhisperTokenizer,
    text_tokens: list[int],
    token_probs: list[float],
    num_frames: int,
    medfilt_width: int = 7,
) -> list[Word]:
    """:func:`find_alignment` from the alignment heads' scores ``qk`` already computed for
    :func:`alignment_tokens` (a batched backend computes many windows' at once)."""
    if not text_tokens:
        return []
    first_row = len(tok.sot_sequence())  # the row of <|notimestamps|> predicts the first text token
    return words_from_matrix(alignment_matrix(qk, num_frames, first_row, medfilt_width), tok, text_tokens, token_probs)


def words_from_matrix(
    matrix: np.ndarray, tok: WhisperTokenizer, text_tokens: list[int], token_probs: list[float]
) -> list[Word]:
    """Words and their times from :func:`alignment_matrix` ``[len(text_tokens) + 1, frames]``."""
    return words_from_matrices([matrix], tok, [text_tokens], [token_probs])[0]


def words_from_matrices(
    matrices: Sequence[np.ndarray],
    tok: WhisperTokenizer,
    tokens_list: Sequence[list[int]],
    probs_list: Sequence[list[float]],
) -> list[list[Word]]:
    """:func:`words_from_matrix` of many windows, their DTW paths found together (:func:`dtw_batch`)."""
    if not len(matrices) == len(tokens_list) == len(probs_list):
        raise ValueError("one token row and one probability row per matrix")
    for tokens, probs in zip(tokens_list, probs_list, strict=True):
        if len(probs) != len(tokens):
            raise ValueError(f"{len(probs)} probabilities for {len(tokens)} tokens")
    timed = [k for k, tokens in enumerate(tokens_list) if tokens]
    paths = dict(zip(timed, dtw_batch([-matrices[k] for k in timed]), strict=True))
    return [_words(paths[k], tok, tokens_list[k], probs_list[k]) if k in paths else [] for k in range(len(matrices))]


def _words(
    path: tuple[np.ndarray, np.ndarray], tok: WhisperTokenizer, text_tokens: list[int], token_probs: list[float]
) -> list[Word]:
    """The words of ``text_tokens`` and their times from a DTW path through their matrix."""
    text_idx, time_idx = path
    probs = np.asarray(token_probs)
    words, word_tokens = tok.split_to_word_tokens([*text_tokens, tok.eot])
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = time_idx[jumps] / TOKENS_PER_SECOND
    starts = jump_times[boundaries[:-1]]
    ends = jump_times[boundaries[1:]]
    spans = itertools.pairwise(boundaries)
    return [
        Word(word, float(s), float(e), float(np.mean(probs[i:j])), toks)
        for word, toks, s, e, (i, j) in zip(words[:-1], word_tokens[:-1], starts, ends, spans, strict=True)
    ]


def merge_punctuations(words: list[Word]) -> list[Word]:
    """Attach leading punctuation to the next word and trailing punctuation to the previous one."""
    words = [Word(w.word, w.start, w.end, w.p, list(w.tokens)) for w in words]
    i = len(words) - 2
    while i >= 0:  # prepended: an opening quote or bracket belongs to the word after it
        prev, nxt = words[i], words[i + 1]
        if prev.word.startswith(" ") and prev.word.strip() in PREPEND_PUNCTUATION and prev.word.strip():
            nxt.word = prev.word + nxt.word
            nxt.tokens = prev.tokens + nxt.tokens
            nxt.start = prev.start
            prev.word, prev.tokens = "", []
        i -= 1
    i = 0
    while i < len(words) - 1:  # appended: a full stop or comma belongs to the word before it
        prev, nxt = words[i], words[i + 1]
        if prev.word and not prev.word.endswith(" ") and nxt.word in APPEND_PUNCTUATION and nxt.word:
            prev.word = prev.word + nxt.word
            prev.tokens = prev.tokens + nxt.tokens
            nxt.word, nxt.tokens = "", []
        i += 1
    return [w for w in words if w.word]
