"""What the decoder says about its own window: rules that drop a streamed window as no speech.

The VAD decides what reaches the engine; this is the last word, from the model itself. A rule
fires on a window's :class:`~whisper_engine.decoding.DecodingResult`; a dropped window gives no words (so
no partial, and no final when it is the utterance's last decode). Each rule can be switched
off (``None``) and is counted by name where it fires (``/metrics``).

Measured with ``benchmarks/guard.py`` (BENCHMARKS.md): the defaults are the rules that removed
hallucinated words on the non-speech set without costing words on the dev corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decoding import DecodingResult

__all__ = ["GUARD_RULES", "WindowGuard"]

GUARD_RULES = ("no_speech", "certain_no_speech", "logprob", "compression", "repeats")


@dataclass(frozen=True)
class WindowGuard:
    no_speech: float | None = 0.6  # Whisper's rule: no-speech probability over this ...
    no_speech_logprob: float = -1.0  # ... and an average log-probability under this
    certain_no_speech: float | None = None  # the no-speech probability alone over this
    logprob: float | None = None  # the average log-probability alone under this
    compression: float | None = None  # gzip compression ratio of the text over this (a loop)
    repeats: int | None = None  # the same word this many times in a row ("Whoa! Whoa! Whoa!")

    def check(self, result: DecodingResult) -> str | None:
        """The name of the first rule that drops this window, or ``None`` to keep it."""
        no_speech = self.no_speech is not None and result.no_speech_prob > self.no_speech
        if no_speech and result.avg_logprob < self.no_speech_logprob:
            return "no_speech"
        if self.certain_no_speech is not None and result.no_speech_prob > self.certain_no_speech:
            return "certain_no_speech"
        if self.logprob is not None and result.avg_logprob < self.logprob:
            return "logprob"
        if self.compression is not None and result.compression_ratio > self.compression:
            return "compression"
        if self.repeats is not None and longest_repeat(result.text) >= self.repeats:
            return "repeats"
        return None


def longest_repeat(text: str) -> int:
    """The longest run of one word said again and again (case and punctuation aside)."""
    keys = [w.strip(".,!?;:\"'-…").lower() for w in text.split()]
    best = run = 0
    for i, key in enumerate(keys):
        run = run + 1 if i and key and key == keys[i - 1] else 1
        best = max(best, run)
    return best
