"""``streamd transcribe`` end to end: the real command in a subprocess, the bundled model, real speech.

Each model-loading run costs about a second, so every run below checks several things.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from .conftest import speech_file

ROOT = Path(__file__).resolve().parents[1]
JFK_TEXT = "And so my fellow Americans ask not what your country can do for you ask what you can do for your country."
EPS = 0.0015  # jsonl times are rounded to the millisecond

SRT_TIME = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"
VTT_TIME = r"(\d\d):(\d\d):(\d\d)\.(\d\d\d)"


def streamd(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamd", "transcribe", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def squash(text: str) -> str:
    return " ".join(text.split())


def seconds(match: re.Match[str]) -> float:
    h, m, s, ms = (int(g) for g in match.groups())
    assert m < 60 and s < 60
    return h * 3600 + m * 60 + s + ms / 1000


def check_transcript(obj: dict, path: Path, *, words: bool = True) -> None:
    """The structure and internal consistency of one jsonl record."""
    assert set(obj) == {"file", "text", "segments", "audio_s", "elapsed_s"}
    assert obj["file"] == str(path)
    assert obj["audio_s"] == pytest.approx(sf.info(str(path)).duration, abs=0.002)
    assert 0 < obj["elapsed_s"] < 120
    segments = obj["segments"]
    assert segments, obj
    assert squash("".join(s["text"] for s in segments)) == squash(obj["text"])
    previous_end = 0.0
    for seg in segments:
        assert set(seg) == {"start", "end", "text", "words"}
        assert seg["text"].strip()
        assert previous_end - EPS <= seg["start"] < seg["end"] <= obj["audio_s"] + EPS, segments
        previous_end = seg["end"]
        if not words:
            assert seg["words"] == []
            continue
        assert seg["words"], seg
        assert "".join(w["word"] for w in seg["words"]).strip() == seg["text"].strip()
        word_end = seg["start"]
        for w in seg["words"]:
            assert set(w) == {"word", "start", "end", "p"}
            assert w["word"].strip()
            assert seg["start"] - EPS <= w["start"] <= w["end"] <= seg["end"] + EPS, (seg["start"], seg["end"], w)
            assert w["start"] >= word_end - EPS, seg["words"]
            word_end = w["end"]
            assert 0.0 < w["p"] <= 1.0


@pytest.fixture(scope="module")
def phrase() -> Path:
    """A short phrase: "Please call Stella." (2 s, VCTK)."""
    return speech_file("dev_vctk_p287_001_clean")


@pytest.fixture(scope="module")
def jsonl(jfk: Path, phrase: Path) -> subprocess.CompletedProcess[str]:
    return streamd("--format", "jsonl", jfk, phrase)


@pytest.fixture(scope="module")
def jsonl_records(jsonl: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    assert jsonl.returncode == 0, jsonl.stderr
    return {obj["file"]: obj for obj in map(json.loads, jsonl.stdout.splitlines())}


def test_jsonl_two_real_files(jsonl: subprocess.CompletedProcess[str], jfk: Path, phrase: Path) -> None:
    assert jsonl.returncode == 0, jsonl.stderr
    assert jsonl.stderr == ""
    lines = jsonl.stdout.splitlines()
    assert len(lines) == 2, jsonl.stdout
    first, second = (json.loads(line) for line in lines)
    assert isinstance(first, dict) and isinstance(second, dict)

    check_transcript(first, jfk)
    assert squash(first["text"]) == JFK_TEXT
    assert first["audio_s"] == pytest.approx(11.0, abs=0.001)
    # Word times are real alignments, not spread evenly: "Americans" comes around 2 s, "country." near the end.
    words = [w for s in first["segments"] for w in s["words"]]
    assert [w["word"].strip() for w in words] == JFK_TEXT.split()
    assert 1.0 < next(w for w in words if w["word"].strip() == "Americans")["start"] < 3.0
    assert 9.5 < words[-1]["end"] <= 11.0

    check_transcript(second, phrase)
    assert second["audio_s"] == pytest.approx(1.96, abs=0.002)
    assert "stella" in second["text"].lower() and "call" in second["text"].lower(), second["text"]


def test_bad_files_are_reported_and_good_ones_still_transcribed(tmp_path: Path, jfk: Path, phrase: Path) -> None:
    missing = tmp_path / "missing.wav"
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(bytes(range(256)) * 40)
    result = streamd("--format", "jsonl", "--no-word-timestamps", missing, phrase, corrupt, jfk)

    assert result.returncode == 1, result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == 2, result.stderr
    assert str(missing) in errors[0] and str(corrupt) not in errors[0]
    assert str(corrupt) in errors[1] and str(missing) not in errors[1]
    assert all(e.startswith("streamd: ") for e in errors)

    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    short, speech = (json.loads(line) for line in lines)
    assert short["file"] == str(phrase) and speech["file"] == str(jfk)
    # --no-word-timestamps: same segments, no words.
    check_transcript(short, phrase, words=False)
    check_transcript(speech, jfk, words=False)
    assert squash(speech["text"]) == JFK_TEXT


def test_srt_on_stdout_matches_jsonl(jfk: Path, phrase: Path, jsonl_records: dict[str, dict]) -> None:
    result = streamd("--format", "srt", jfk, phrase)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # Files follow one another, each numbered from 1; blank lines separate blocks and files.
    blocks = re.split(r"\n(?:[ \t]*\n)+", result.stdout.strip("\n"))
    expected = [s for path in (jfk, phrase) for s in jsonl_records[str(path)]["segments"]]
    numbers = [i for path in (jfk, phrase) for i in range(1, len(jsonl_records[str(path)]["segments"]) + 1)]
    assert len(blocks) == len(expected), result.stdout
    for block, number, seg in zip(blocks, numbers, expected, strict=True):
        lines = block.split("\n")
        assert len(lines) == 3, block
        assert lines[0] == str(number)
        m = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
        assert m, lines[1]
        start = seconds(re.match(SRT_TIME, lines[1]))
        end = seconds(re.search(SRT_TIME + "$", lines[1]))
        assert start == pytest.approx(seg["start"], abs=EPS)
        assert end == pytest.approx(seg["end"], abs=EPS)
        assert lines[2] == seg["text"].strip()
    assert "." not in "".join(b.split("\n")[1] for b in blocks)


def test_vtt_to_output_dir_matches_jsonl(
    tmp_path: Path, jfk: Path, phrase: Path, jsonl_records: dict[str, dict]
) -> None:
    out = tmp_path / "subs" / "nested"
    result = streamd("--format", "vtt", "--output-dir", out, jfk, phrase)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.vtt" for p in (jfk, phrase))
    for path in (jfk, phrase):
        text = (out / f"{path.stem}.vtt").read_text(encoding="utf-8")
        assert text.startswith("WEBVTT\n\n")
        blocks = text[len("WEBVTT\n\n") :].strip("\n").split("\n\n")
        segments = jsonl_records[str(path)]["segments"]
        assert len(blocks) == len(segments), text
        for block, seg in zip(blocks, segments, strict=True):
            lines = block.split("\n")
            assert len(lines) == 2, block
            assert re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}", lines[0]), lines[0]
            assert "," not in lines[0]
            assert seconds(re.match(VTT_TIME, lines[0])) == pytest.approx(seg["start"], abs=EPS)
            assert seconds(re.search(VTT_TIME + "$", lines[0])) == pytest.approx(seg["end"], abs=EPS)
            assert lines[1] == seg["text"].strip()


def test_text_format_on_44k1_stereo_flac_copy(tmp_path: Path, jfk: Path, jsonl_records: dict[str, dict]) -> None:
    speech, rate = sf.read(str(jfk), dtype="float32")
    assert rate == 16000
    y = resample_poly(speech, 441, 160).astype(np.float32)
    flac = tmp_path / "jfk copy.flac"
    sf.write(str(flac), np.stack([y, y], axis=1), 44100, format="FLAC")
    assert (sf.info(str(flac)).samplerate, sf.info(str(flac)).channels) == (44100, 2)

    result = streamd(flac)  # --format text is the default
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # One file: just the text, no file name prefix.
    assert result.stdout == JFK_TEXT + "\n"
    assert squash(jsonl_records[str(jfk)]["text"]) == JFK_TEXT


def test_argument_and_model_errors(tmp_path: Path, jfk: Path) -> None:
    for beam in ("0", "-2"):
        result = streamd("--beam-size", beam, jfk, timeout=60)
        assert result.returncode == 2, (beam, result.stderr)
        assert result.stdout == ""
        assert result.stderr.strip() == "streamd: --beam-size must be at least 1"

    model = tmp_path / "nonexistent"
    result = streamd("--model", model, jfk, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    errors = result.stderr.splitlines()
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("streamd: ") and str(model) in errors[0]


def test_music_gives_no_text_and_only_speech_is_decoded(jfk, tmp_path):
    """The same two-stage VAD as the daemon: the guitar is no speech, JFK after it still is."""
    music = ROOT / "tests" / "data" / "music_acoustic_guitar.flac"
    guitar, _ = sf.read(music, dtype="float32")
    speech, _ = sf.read(jfk, dtype="float32")
    both = tmp_path / "guitar_then_jfk.wav"
    sf.write(both, np.concatenate([guitar, np.zeros(8000, np.float32), speech]), 16000)
    run = streamd("--format", "jsonl", music, both)
    assert run.returncode == 0, run.stderr
    alone, mixed = (json.loads(line) for line in run.stdout.splitlines())
    assert alone["text"] == "" and alone["segments"] == []
    assert squash(mixed["text"]).lower().startswith("and so my fellow americans")
    assert mixed["segments"][0]["start"] >= len(guitar) / 16000 - 0.5
    bad = streamd("--speech-threshold", "2", music)
    assert bad.returncode == 2 and "speech threshold" in bad.stderr
