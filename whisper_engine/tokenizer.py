"""Whisper's tokenizer: ``tokenizers`` for the BPE, special-token ids read from ``tokenizer.json``."""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .weights import ModelError

__all__ = ["WhisperTokenizer"]


@dataclass
class WhisperTokenizer:
    """Token ids of Whisper's special tokens and text/token conversion.

    Every special id comes from the model's ``tokenizer.json``; only the token *names* are fixed,
    because they are Whisper's protocol. Timestamp tokens follow ``<|notimestamps|>``, one per
    20 ms, so their first id is derived from it rather than taken from the (absent) vocabulary.
    """

    path: Path
    n_vocab: int

    def __post_init__(self) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except FileNotFoundError:
            raise ModelError(self.path, "missing: the model folder needs its tokenizer.json") from None
        except Exception as e:
            raise ModelError(self.path, f"unreadable tokenizer: {e}") from None
        self._special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        for name in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
            if name not in self._special:
                raise ModelError(self.path, f"unsupported: tokenizer has no {name} token")

    def special(self, name: str) -> int:
        return self._special[name]

    @property
    def eot(self) -> int:
        return self._special["<|endoftext|>"]

    @property
    def sot(self) -> int:
        return self._special["<|startoftranscript|>"]

    @property
    def sot_prev(self) -> int:
        return self._special["<|startofprev|>"]

    @property
    def no_timestamps(self) -> int:
        return self._special["<|notimestamps|>"]

    @property
    def no_speech(self) -> int:
        # Renamed across Whisper versions.
        return self._special.get("<|nospeech|>", self._special.get("<|nocaptions|>", -1))

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @property
    def multilingual(self) -> bool:
        return self.n_vocab >= 51865

    def sot_sequence(self, language: str | None = "en", task: str = "transcribe") -> list[int]:
        """``<|startoftranscript|>`` plus language and task for multilingual models."""
        seq = [self.sot]
        if self.multilingual:
            lang = self._special.get(f"<|{language or 'en'}|>")
            if lang is None:
                raise ValueError(f"language {language!r} is not in this model's tokenizer")
            seq += [lang, self._special[f"<|{task}|>"]]
        return seq

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, tokens: list[int]) -> str:
        """Text of the text tokens; special and timestamp tokens are dropped."""
        return self._tok.decode([t for t in tokens if t < self.eot], skip_special_tokens=True)

    def decode_token_bytes(self, token: int) -> str:
        return self._tok.decode([token], skip_special_tokens=False)

    @cached_property
    def non_speech_tokens(self) -> list[int]:
        """Tokens for symbols that are rarely spoken (speaker tags, music notes...), as openai/whisper
        suppresses them when a model's files give no list of their own."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += [
            "<<",
            ">>",
            "<<<",
            ">>>",
            "--",
            "---",
            "-(",
            "-[",
            "('",
            '("',
            "((",
            "))",
            "(((",
            ")))",
            "[[",
            "]]",
            "{{",
            "}}",
            "♪♪",
            "♪♪♪",
        ]
        miscellaneous = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + list(miscellaneous):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in miscellaneous:
                    result.add(tokens[0])
        return sorted(result)

    def split_to_word_tokens(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Group text tokens into words: a word starts at a token beginning with a space or
        punctuation. Returns the words' text and their tokens."""
        words: list[str] = []
        groups: list[list[int]] = []
        for token in tokens:
            piece = self.decode_token_bytes(token)
            special = token >= self.eot
            starts_word = piece.startswith(" ") or (piece.strip() in string.punctuation and piece.strip() != "")
            if not words or special or groups[-1][0] >= self.eot or starts_word or "\ufffd" in words[-1]:
                words.append(piece)
                groups.append([token])
            else:
                words[-1] += piece
                groups[-1].append(token)
        # Merge pieces that only complete a multi-byte character into their word.
        merged_w: list[str] = []
        merged_t: list[list[int]] = []
        for w, g in zip(words, groups, strict=False):
            if merged_w and "\ufffd" in merged_w[-1]:
                merged_t[-1] += g
                merged_w[-1] = self._tok.decode(merged_t[-1])
            else:
                merged_w.append(w)
                merged_t.append(g)
        return merged_w, merged_t
