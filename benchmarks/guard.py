"""The window guard, rule by rule: words it removes where nobody speaks, words it costs on speech.

Streams every file through :class:`streamd.stream.Stream` on the virtual clock of
``stream_sim.py`` (the daemon's jobs, no sockets) under each guard variant, and prints a table:

- non-speech set with webrtcvad alone (``--speech-detector off``: what the guard sees when the
  neural VAD lets a sound through): words in finals and files with any;
- the same with the default VAD;
- the dev corpus with the default VAD: WER of each file's joined finals (corpus-level).

    python benchmarks/guard.py                    # every variant
    python benchmarks/guard.py --variants none whisper
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SHARED, corpus_wer, reference
from stream_sim import simulate

from streamd.audio import load_audio
from streamd.stream import StreamConfig
from streamd.vad import VadConfig
from whisper_engine.engine import Engine
from whisper_engine.guard import WindowGuard

NONE = WindowGuard(no_speech=None)
WHISPER = WindowGuard()  # no-speech probability > 0.6 with average log-probability < -1 (the default)
VARIANTS = {
    "none": NONE,
    "whisper": WHISPER,
    "+certain_no_speech 0.9": replace(WHISPER, certain_no_speech=0.9),
    "+logprob -1.0": replace(WHISPER, logprob=-1.0),
    "+compression 2.4": replace(WHISPER, compression=2.4),
    "+repeats 3": replace(WHISPER, repeats=3),
}


def words_on(engine: Engine, files: list[Path], vad: VadConfig) -> tuple[int, int, list[str]]:
    words, with_text, texts = 0, 0, []
    for path in files:
        text = simulate(engine, load_audio(path), replace(StreamConfig(), vad=vad))["text"].strip()
        if text:
            words += len(text.split())
            with_text += 1
            texts.append(f"{path.stem}: {text[:60]!r}")
    return words, with_text, texts


def dev_wer(engine: Engine, files: list[Path]) -> float:
    hyps = [simulate(engine, load_audio(path), StreamConfig())["text"] for path in files]
    return 100 * corpus_wer([reference(path) for path in files], hyps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-dev", action="store_true", help="skip the dev corpus column")
    args = p.parse_args()
    nonspeech, dev = sorted((SHARED / "nonspeech").glob("*.wav")), sorted((SHARED / "dev").glob("*.wav"))
    engine = Engine.load()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {len(nonspeech)} non-speech, {len(dev)} dev files")
    print("| guard | webrtcvad alone: words / files | default VAD: words / files | dev WER % (default VAD) |")
    print("|---|---:|---:|---:|")
    for name in args.variants:
        engine.guard, engine.guard_dropped = VARIANTS[name], {}
        off = words_on(engine, nonspeech, VadConfig(detector="off"))
        on = words_on(engine, nonspeech, VadConfig())
        wer = "-" if args.no_dev else f"{dev_wer(engine, dev):.2f}"
        print(f"| {name} | {off[0]} / {off[1]} | {on[0]} / {on[1]} | {wer} |", flush=True)
        for line in off[2]:
            print(f"|   | {line} | | |", flush=True)
        print(f"|   | dropped windows per rule: {engine.guard_dropped} | | |", flush=True)


if __name__ == "__main__":
    main()
