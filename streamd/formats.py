"""Transcript output formats: plain text, JSON lines, SubRip and WebVTT."""

from __future__ import annotations

import json

from whisper_engine.transcribe import Transcript

__all__ = ["FORMATS", "TRANSCRIPT_FORMATS", "render", "render_sessions"]

FORMATS = ("text", "jsonl", "srt", "vtt")
TRANSCRIPT_FORMATS = ("txt", "srt", "vtt", "json")


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


def render_sessions(source: str, sessions: list[tuple[str, float, list[dict]]], fmt: str) -> tuple[str, str]:
    """A live source's transcript from its sessions ``(session, started wall clock, final
    messages)``, oldest first: ``txt`` (a paragraph per session), ``srt``/``vtt`` (a cue per
    final, timed from the first session's start: each session sits at its wall-clock start) or
    ``json``. Returns the body and its content type."""
    first = sessions[0][1] if sessions else 0.0
    cues = [(started - first + f["start"], started - first + f["end"], f["text"]) for _, started, finals in sessions
            for f in finals]  # fmt: skip
    if fmt == "txt":
        paragraphs = [" ".join(f["text"].strip() for f in finals) for _, _, finals in sessions]
        return "\n\n".join(p for p in paragraphs if p) + "\n", "text/plain; charset=utf-8"
    if fmt == "srt":
        blocks = [f"{i}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{t.strip()}\n" for i, (a, b, t) in enumerate(cues, 1)]
        return "\n".join(blocks), "application/x-subrip; charset=utf-8"
    if fmt == "vtt":
        blocks = [f"{_clock(a, '.')} --> {_clock(b, '.')}\n{t.strip()}\n" for a, b, t in cues]
        return "WEBVTT\n\n" + "\n".join(blocks), "text/vtt; charset=utf-8"
    if fmt == "json":
        obj = {
            "source": source,
            "text": " ".join(t.strip() for _, _, t in cues),
            "sessions": [
                {"session": session, "started": round(started, 3),
                 "finals": [{k: f[k] for k in ("seq", "segment", "start", "end", "text", "words") if k in f}
                            for f in finals]}
                for session, started, finals in sessions
            ],
        }  # fmt: skip
        return json.dumps(obj, ensure_ascii=False, indent=1) + "\n", "application/json"
    raise ValueError(f"unknown transcript format {fmt!r}")
