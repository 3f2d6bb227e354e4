"""Word timestamps from the cross-attention of the model's alignment heads, aligned with DTW.

The decoder is re-run once over a window's text tokens, capturing the raw cross-attention
scores of the heads listed in the model's files (``alignment_heads``). Those are softmaxed over
time, standardised per head, median filtered, averaged, and a monotonic path through
``-attention`` (dynamic time warping) maps every token to an audio frame. A word starts where its
first token's path enters a new frame.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .backend import Backend
from .tokenizer import WhisperTokenizer

__all__ = [
    "Word",
    "alignment_matrix",
    "alignment_tokens",
    "dtw",
    "find_alignment",
    "median_filter",
    "merge_punctuations",
    "words_from_matrix",
    "words_from_scores",
]

TOKENS_PER_SECOND = 50  # encoder positions per second of audio
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

    Steps are diagonal, down (next token, same frame) or right (same token, next frame); ties
    prefer right, then down, as openai/whisper's ``dtw_cpu`` does. Each row is one vectorised
    min-plus scan, so the cost is O(N) numpy calls instead of O(N*M) Python steps.
    Returns the token indices and frame indices of the path.
    """
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    trace = np.zeros((n + 1, m + 1), dtype=np.int8)
    for i in range(1, n + 1):
        x = cost[i - 1].astype(np.float64)
        diag = acc[i - 1, :-1]  # c0 for columns 1..m
        up = acc[i - 1, 1:]  # c1
        best_prev = np.minimum(diag, up)
        # row[j] = x[j] + min(best_prev[j], row[j-1]): a min-plus scan, solved with prefix sums.
        prefix = np.cumsum(x)
        prefix_before = prefix - x
        row = prefix + np.minimum.accumulate(best_prev - prefix_before)
        acc[i, 1:] = row
        left = acc[i, :-1]  # c2
        t = np.full(m, 2, dtype=np.int8)
        t[(diag < up) & (diag < left)] = 0
        t[(up < diag) & (up < left)] = 1
        trace[i, 1:] = t
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = n, m
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
    if not text_tokens:
        return []
    if len(token_probs) != len(text_tokens):
        raise ValueError(f"{len(token_probs)} probabilities for {len(text_tokens)} tokens")
    token_probs = np.asarray(token_probs)
    text_idx, time_idx = dtw(-matrix)

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
        Word(word, float(s), float(e), float(np.mean(token_probs[i:j])), toks)
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
