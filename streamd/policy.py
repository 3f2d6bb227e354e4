"""Commit policy: which words of a growing hypothesis are final.

LocalAgreement-2 (Macháček et al., whisper_streaming): a word is committed once two consecutive
hypotheses of the same audio agree on it and on everything before it. At the end of speech
everything left is committed. Committed words are never revised; the rest is the partial.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Protocol

__all__ = ["CommitPolicy", "LocalAgreement", "TimedWord"]

_STRIP = string.punctuation + "“”‘’«»¿¡…"


@dataclass(frozen=True)
class TimedWord:
    word: str  # with its leading space, as Whisper writes it
    start: float  # stream seconds
    end: float
    p: float

    @property
    def key(self) -> str:
        """What two hypotheses must share to agree: the word without case or punctuation."""
        return self.word.strip().strip(_STRIP).lower()


class CommitPolicy(Protocol):
    """What a stream asks of its commit policy (:class:`LocalAgreement` by default; a second one
    is passed to ``Stream(policy=...)``). It sees only hypotheses of the audio not yet committed:
    the stream forces committed words as the decoder's prefix, so they never come back."""

    def update(self, hypothesis: list[TimedWord]) -> tuple[list[TimedWord], list[TimedWord]]:
        """A new hypothesis of the uncommitted audio; ``(committed, partial)``."""
        ...

    def flush(self, hypothesis: list[TimedWord]) -> list[TimedWord]:
        """The utterance has ended: what of the last hypothesis to commit."""
        ...

    def reset(self) -> None:
        """Forget what was seen (a new utterance, or the window moved)."""
        ...


class LocalAgreement:
    """Keeps the previous hypothesis of the uncommitted audio and commits the agreed prefix."""

    def __init__(self, n: int = 2) -> None:
        if n < 2:
            raise ValueError("agreement needs at least two hypotheses")
        self.n = n
        self._history: list[list[TimedWord]] = []

    def update(self, hypothesis: list[TimedWord]) -> tuple[list[TimedWord], list[TimedWord]]:
        """Take a new hypothesis of the uncommitted audio; return ``(committed, partial)``.

        ``committed`` is the prefix the last ``n`` hypotheses agree on (taken from the newest,
        whose times are the best informed); ``partial`` is the rest of the newest hypothesis.
        """
        self._history = [*self._history[-(self.n - 1) :], hypothesis]
        if len(self._history) < self.n:
            return [], hypothesis
        agreed = 0
        for words in zip(*self._history, strict=False):
            if len({w.key for w in words}) != 1:
                break
            agreed += 1
        committed, partial = hypothesis[:agreed], hypothesis[agreed:]
        # What stays is re-hypothesised from the new commit point on: drop the agreed words.
        self._history = [h[agreed:] for h in self._history]
        return committed, partial

    def flush(self, hypothesis: list[TimedWord]) -> list[TimedWord]:
        """End of speech: the final hypothesis is committed whole."""
        self._history = []
        return hypothesis

    def reset(self) -> None:
        self._history = []
