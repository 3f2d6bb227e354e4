"""Decoding one window: greedy, sampling and beam search over a backend's cached decoder.

Whisper's decoding rules, written for a key/value cache that stays with the backend:
timestamp-token grammar, suppression of blank and non-speech tokens, the no-speech probability,
prompt conditioning, and ranking of finished beams by length-normalised log-probability.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .backend import Backend, DecoderSession
from .tokenizer import WhisperTokenizer
from .weights import WhisperWeights

__all__ = [
    "TIME_PRECISION",
    "DecodingOptions",
    "DecodingResult",
    "GreedyRules",
    "LogitRules",
    "compression_ratio",
    "decode",
    "initial_tokens",
    "loop_start",
    "suppress_list",
]

TIME_PRECISION = 0.02  # seconds per timestamp token


@dataclass(frozen=True)
class DecodingOptions:
    temperature: float = 0.0
    beam_size: int = 1  # 1: greedy (or sampling when temperature > 0)
    best_of: int = 5  # candidates sampled when temperature > 0
    patience: float = 1.0
    length_penalty: float | None = None  # None: divide by length, as Whisper does
    sample_len: int | None = None  # max new tokens; default: half the text context
    prompt: tuple[int, ...] = ()  # previous text, fed after <|startofprev|>
    prefix: tuple[int, ...] = ()  # forced start of the transcript
    without_timestamps: bool = False
    max_initial_timestamp: float = 1.0
    max_timestamp: float | None = None  # window length: timestamps past the audio are impossible
    suppress_blank: bool = True
    suppress_tokens: tuple[int, ...] | None = None  # None: the model's list (or non-speech symbols)
    language: str | None = "en"
    loop_guard: bool = False  # stop a hypothesis that starts over or repeats itself (see loop_start)


@dataclass
class DecodingResult:
    tokens: list[int]
    text: str
    avg_logprob: float
    sum_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float
    token_logprobs: list[float] = field(default_factory=list)
    looped: bool = False  # the loop guard cut this hypothesis short


def compression_ratio(text: str) -> float:
    """Bytes of text over bytes after zlib: high for repetition loops."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    y = x - m
    return y - np.log(np.exp(y).sum(axis=-1, keepdims=True))


class LogitRules:
    """Logit masks applied before each token choice."""

    def __init__(
        self,
        tok: WhisperTokenizer,
        opts: DecodingOptions,
        suppress: list[int],
        sample_begin: int,
        begin_suppress: list[int] | None = None,
    ) -> None:
        self.tok = tok
        self.opts = opts
        self.sample_begin = sample_begin
        self.suppress = np.array(sorted(set(suppress)), dtype=np.int64)
        # Blank and eot at the first position: the model's list, or Whisper's default.
        self.begin_suppress = np.array(begin_suppress or [*tok.encode(" "), tok.eot], dtype=np.int64)
        self.ts_begin = tok.timestamp_begin

    def apply(self, logits: np.ndarray, tokens: list[list[int]]) -> None:
        """Mask ``logits`` ``[B, V]`` in place for the hypotheses ``tokens``."""
        neg = -np.inf
        n_generated = len(tokens[0]) - self.sample_begin
        # No blank start; but after a forced prefix, ending at once is the right answer when the
        # prefix already says everything.
        if n_generated == 0 and self.opts.suppress_blank and not self.opts.prefix:
            logits[:, self.begin_suppress] = neg
        if len(self.suppress):
            logits[:, self.suppress] = neg
        if self.opts.without_timestamps:
            logits[:, self.ts_begin :] = neg
            return
        ts = self.ts_begin
        eot = self.tok.eot
        logits[:, self.tok.no_timestamps] = neg
        if self.opts.max_timestamp is not None:
            last_possible = ts + round(self.opts.max_timestamp / TIME_PRECISION)
            logits[:, last_possible + 1 :] = neg
        for k, seq_all in enumerate(tokens):
            seq = seq_all[self.sample_begin :]
            last_ts = len(seq) >= 1 and seq[-1] >= ts
            penultimate_ts = len(seq) < 2 or seq[-2] >= ts
            if last_ts:
                if penultimate_ts:  # a pair closed: text (or eot) must follow
                    logits[k, ts:] = neg
                else:  # an open timestamp: another timestamp or eot must follow
                    logits[k, :eot] = neg
            stamps = [t for t in seq if t >= ts]
            if stamps:
                # Timestamps never decrease, and a segment is never empty.
                floor = stamps[-1] if (last_ts and not penultimate_ts) else stamps[-1] + 1
                logits[k, ts:floor] = neg
        if n_generated == 0:
            logits[:, :ts] = neg  # the first token is a timestamp
            if self.opts.max_initial_timestamp:
                last_allowed = ts + round(self.opts.max_initial_timestamp / TIME_PRECISION)
                logits[:, last_allowed + 1 :] = neg
        # If the timestamps together are likelier than any text token, take a timestamp.
        logprobs = _log_softmax(logits)
        with np.errstate(divide="ignore"):
            ts_mass = np.logaddexp.reduce(logprobs[:, ts:], axis=-1)
        max_text = logprobs[:, :ts].max(axis=-1)
        logits[ts_mass > max_text, :ts] = neg


def initial_tokens(tok: WhisperTokenizer, opts: DecodingOptions, n_text_ctx: int) -> tuple[list[int], int, int]:
    """Prompt + start-of-transcript sequence + prefix; returns the tokens, the index of <|sot|>
    and the index where the transcript's text (the prefix, if any) begins."""
    tokens: list[int] = []
    if opts.prompt:
        tokens = [tok.sot_prev, *list(opts.prompt)[-(n_text_ctx // 2 - 1) :]]
    sot_index = len(tokens)
    tokens += tok.sot_sequence(opts.language)
    if opts.without_timestamps:
        tokens.append(tok.no_timestamps)
    text_index = len(tokens)
    if opts.prefix:
        tokens += list(opts.prefix)[-(n_text_ctx // 2 - 1) :]
    return tokens, sot_index, text_index


def suppress_list(tok: WhisperTokenizer, opts: DecodingOptions, model_list: list[int]) -> list[int]:
    base = list(opts.suppress_tokens) if opts.suppress_tokens is not None else (model_list or tok.non_speech_tokens)
    specials = [tok.sot, tok.sot_prev, tok.no_speech]
    for name in ("<|transcribe|>", "<|translate|>", "<|startoflm|>"):
        with contextlib.suppress(KeyError):
            specials.append(tok.special(name))
    return [t for t in [*base, *specials] if t >= 0]


@dataclass(frozen=True)
class GreedyRules:
    """The tokens greedy decoding without timestamps (the streaming mode) masks, for a device to
    turn into its masks.

    Built from this module's own rules by :meth:`from_tokenizer`, so a batched decoder
    (:meth:`whisper_engine.backend.BatchedBackend.decode_greedy_batch`) masks exactly what
    :func:`decode` masks with ``without_timestamps=True``.
    """

    eot: int
    sot: int
    no_speech: int
    suppress: tuple[int, ...]  # masked at every step (timestamps included)
    begin_suppress: tuple[int, ...]  # also masked at the first step of a row without a prefix

    @classmethod
    def from_tokenizer(cls, tok: WhisperTokenizer, weights: WhisperWeights) -> GreedyRules:
        opts = DecodingOptions(without_timestamps=True)
        suppress_tokens = suppress_list(tok, opts, weights.suppress_tokens)
        rules = LogitRules(tok, opts, suppress_tokens, 0, weights.suppress_tokens_begin)
        suppress = sorted({*rules.suppress.tolist(), *range(tok.timestamp_begin, weights.dims.n_vocab)})
        return cls(tok.eot, tok.sot, tok.no_speech, tuple(suppress), tuple(rules.begin_suppress.tolist()))

    @staticmethod
    def initial_tokens(
        tok: WhisperTokenizer, prompt: Sequence[int] = (), prefix: Sequence[int] = (), n_text_ctx: int = 448
    ) -> list[int]:
        """``<|startofprev|> prompt <|sot|>... <|notimestamps|> prefix``, as decoding builds it."""
        opts = DecodingOptions(without_timestamps=True, prompt=tuple(prompt), prefix=tuple(prefix))
        return initial_tokens(tok, opts, n_text_ctx)[0]


RESTART_NGRAM = 4
REPEAT_NGRAM = 8
SHORT_REPEAT_MIN = 3


def loop_start(seq: list[int], text_begin: int, sample_begin: int, ts_begin: int) -> int | None:
    """Index in ``seq`` where a loop's first repeated copy begins, or ``None``.

    A hypothesis loops when its text starts over (its last 4 text tokens are its first 4),
    repeats an 8-token run it already produced, or says a 3 to 7-token phrase twice in a row.
    The text begins at ``text_begin`` (a forced prefix counts: a restart of the prefix is a loop
    too); the cut is never inside the prefix, which ends at ``sample_begin``. Unpadded windows
    make Whisper do this at the end of the audio: it never saw speech end without silence.
    """
    positions = [i for i in range(text_begin, len(seq)) if seq[i] < ts_begin]
    text = [seq[i] for i in positions]
    n = len(text)
    cut = None
    if n >= 2 * RESTART_NGRAM and text[-RESTART_NGRAM:] == text[:RESTART_NGRAM]:
        cut = positions[n - RESTART_NGRAM]
    elif n >= 2 * REPEAT_NGRAM and any(
        text[i : i + REPEAT_NGRAM] == text[-REPEAT_NGRAM:] for i in range(n - 2 * REPEAT_NGRAM + 1)
    ):
        cut = positions[n - REPEAT_NGRAM]
    else:
        # A phrase of 3+ tokens said twice back to back ("Ask not. Ask not.").
        for k in range(SHORT_REPEAT_MIN, min(REPEAT_NGRAM, n // 2 + 1)):
            if text[-k:] == text[-2 * k : -k]:
                cut = positions[n - k]
                break
    if cut is None or len(seq) <= sample_begin:
        return None
    return max(cut, sample_begin)


def decode(
    backend: Backend,
    features: object,
    tok: WhisperTokenizer,
    opts: DecodingOptions = DecodingOptions(),
    model_suppress: list[int] | None = None,
    model_suppress_begin: list[int] | None = None,
    rng: np.random.Generator | None = None,
) -> DecodingResult:
    """Decode one window of encoded audio and return the best hypothesis."""
    n_text_ctx = backend.dims.n_text_ctx
    initial, sot_index, text_begin = initial_tokens(tok, opts, n_text_ctx)
    sample_begin = len(initial)
    sample_len = opts.sample_len or n_text_ctx // 2
    sample_len = min(sample_len, n_text_ctx - sample_begin)
    rules = LogitRules(tok, opts, suppress_list(tok, opts, model_suppress or []), sample_begin, model_suppress_begin)

    beam = opts.beam_size > 1 and opts.temperature == 0
    n_rows = opts.beam_size if beam else (opts.best_of if opts.temperature > 0 else 1)
    session = backend.decoder(features, n_rows)
    batch = np.tile(np.array(initial, dtype=np.int64), (n_rows, 1))
    logits = session.step(batch, positions=(sot_index, -1))
    sot_logits = logits[0, 0].astype(np.float64)
    no_speech_prob = float(np.exp(_log_softmax(sot_logits)[tok.no_speech])) if tok.no_speech >= 0 else 0.0
    logits = logits[:, 1]

    def looping(seq: list[int]) -> bool:
        return loop_start(seq, text_begin, sample_begin, tok.timestamp_begin) is not None

    search = _Search(session, rules, opts, initial, sample_len, tok.eot, looping if opts.loop_guard else None)
    best = _beam_search(search, logits) if beam else _sample(search, logits, rng)
    tokens, sum_logprob, token_logprobs, looped = best
    if looped:
        # Keep what came before the loop; close it at the end of the window.
        cut = loop_start(tokens, text_begin, sample_begin, tok.timestamp_begin) or len(tokens)
        tokens = tokens[:cut]
        token_logprobs = token_logprobs[: cut - sample_begin]
        sum_logprob = float(sum(token_logprobs))
        if not opts.without_timestamps and opts.max_timestamp is not None and tokens[-1] < tok.timestamp_begin:
            tokens.append(tok.timestamp_begin + round(opts.max_timestamp / TIME_PRECISION))
    text_tokens = tokens[sample_begin:]
    if text_tokens and text_tokens[-1] == tok.eot:
        text_tokens = text_tokens[:-1]
    text = tok.decode(text_tokens)
    return DecodingResult(
        tokens=text_tokens,
        text=text,
        avg_logprob=sum_logprob / (len(text_tokens) + 1),
        sum_logprob=sum_logprob,
        no_speech_prob=no_speech_prob,
        temperature=opts.temperature,
        compression_ratio=compression_ratio(text),
        token_logprobs=token_logprobs,
        looped=looped,
    )


@dataclass
class _Search:
    """What a search loop needs besides the logits: the cached decoder, the masks, the limits."""

    session: DecoderSession
    rules: LogitRules
    opts: DecodingOptions
    initial: list[int]
    sample_len: int
    eot: int
    looping: Callable[[list[int]], bool] | None


def _sample(search: _Search, logits: np.ndarray, rng: np.random.Generator | None):
    """Greedy (temperature 0) or sampled decoding of every row; returns the best finished row."""
    session, rules, opts, initial, eot = search.session, search.rules, search.opts, search.initial, search.eot
    n = logits.shape[0]
    seqs = [list(initial) for _ in range(n)]
    sum_lp = np.zeros(n)
    lps: list[list[float]] = [[] for _ in range(n)]
    done = np.zeros(n, dtype=bool)
    looped = np.zeros(n, dtype=bool)
    rng = rng or np.random.default_rng(0)
    for _ in range(search.sample_len):
        logits = logits.astype(np.float64)
        rules.apply(logits, seqs)
        logprobs = _log_softmax(logits)
        if opts.temperature == 0:
            next_tokens = logits.argmax(-1)
        else:
            p = np.exp(_log_softmax(logits / opts.temperature))
            next_tokens = np.array([rng.choice(len(row), p=row / row.sum()) for row in p])
        for k in range(n):
            if done[k]:
                next_tokens[k] = eot
                continue
            t = int(next_tokens[k])
            lp = float(logprobs[k, t])
            sum_lp[k] += lp
            lps[k].append(lp)
            seqs[k].append(t)
            if t == eot:
                done[k] = True
            elif search.looping is not None and search.looping(seqs[k]):
                done[k] = looped[k] = True
        if done.all():
            break
        logits = session.step(next_tokens[:, None].astype(np.int64))[:, -1]
    lengths = np.array([len(s) - len(initial) for s in seqs])
    scores = _rank_scores(sum_lp, lengths, opts.length_penalty)
    best = int(np.argmax(scores))
    return seqs[best], float(sum_lp[best]), lps[best], bool(looped[best])


def _rank_scores(sum_lp: np.ndarray, lengths: np.ndarray, length_penalty: float | None) -> np.ndarray:
    lengths = np.maximum(lengths, 1)
    penalty = lengths if length_penalty is None else ((5 + lengths) / 6) ** length_penalty
    return sum_lp / penalty


def _beam_search(search: _Search, logits: np.ndarray):
    """Whisper-style beam search: keep ``beam_size`` live beams, collect ``beam_size * patience``
    finished ones, rank by length-normalised log-probability."""
    session, rules, opts, initial, eot = search.session, search.rules, search.opts, search.initial, search.eot
    beam_size = opts.beam_size
    max_finished = max(1, round(beam_size * opts.patience))
    beams: list[tuple[list[int], float, list[float]]] = [(list(initial), 0.0, []) for _ in range(beam_size)]
    finished: dict[tuple[int, ...], tuple[float, list[float]]] = {}
    for step in range(search.sample_len):
        logits = logits.astype(np.float64)
        rules.apply(logits, [b[0] for b in beams])
        logprobs = _log_softmax(logits)
        candidates: dict[tuple[int, ...], tuple[float, int, list[float]]] = {}
        for k, (seq, score, lps) in enumerate(beams):
            row = logprobs[k]
            top = np.argpartition(-row, beam_size)[: beam_size + 1]
            for t in top:
                lp = float(row[t])
                if lp == -np.inf:
                    continue
                key = (*seq, int(t))
                if key not in candidates:
                    candidates[key] = (score + lp, k, [*lps, lp])
        ranked = sorted(candidates.items(), key=lambda kv: kv[1][0], reverse=True)
        next_beams: list[tuple[list[int], float, list[float]]] = []
        sources: list[int] = []
        for key, (score, src, lps) in ranked:
            if key[-1] == eot or (search.looping is not None and search.looping(list(key))):
                if len(finished) < max_finished:
                    finished[key] = (score, lps)
            else:
                next_beams.append((list(key), score, lps))
                sources.append(src)
            if len(next_beams) == beam_size:
                break
        if len(finished) >= max_finished or not next_beams or step == search.sample_len - 1:
            break
        while len(next_beams) < beam_size:  # fewer live candidates than beams: repeat the best
            next_beams.append(next_beams[0])
            sources.append(sources[0])
        session.reorder(np.array(sources))
        beams = next_beams
        logits = session.step(np.array([[b[0][-1]] for b in beams], dtype=np.int64))[:, -1]
    # Too few finished: the best live beams count as finished (as Whisper does).
    for seq, score, lps in sorted(beams, key=lambda b: b[1], reverse=True):
        if len(finished) >= beam_size:
            break
        finished.setdefault(tuple(seq), (score, lps))
    keys = list(finished)
    sum_lp = np.array([finished[k][0] for k in keys])
    lengths = np.array([len(k) - len(initial) for k in keys])
    best = int(np.argmax(_rank_scores(sum_lp, lengths, opts.length_penalty)))
    best_seq = list(keys[best])
    return best_seq, float(sum_lp[best]), finished[keys[best]][1], best_seq[-1] != eot
