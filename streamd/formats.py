"""Transcript output formats: plain text, JSON lines, SubRip and WebVTT."""

from __future__ import annotations

import json

from npu.transcribe import Transcript

__all__ = ["FORMATS", "render"]

FORMATS = ("text", "jsonl", "srt", "vtt")


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(t: Transcript) -> str:
    blocks = [
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n" for i, s in enumerate(t.segments, 1)
    ]
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    blocks = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n" for s in t.segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_json(t: Transcript, file: str, elapsed_s: float) -> str:
    obj = {"file": file, **t.to_dict(), "elapsed_s": round(elapsed_s, 3)}
    obj["audio_s"] = round(t.duration, 3)
    return json.dumps(obj, ensure_ascii=False)


def render(t: Transcript, fmt: str, file: str, elapsed_s: float) -> str:
    if fmt == "text":
        return t.text
    if fmt == "jsonl":
        return to_json(t, file, elapsed_s)
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    raise ValueError(f"unknown format {fmt!r}")
