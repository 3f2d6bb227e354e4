"""Non-speech benchmark: words Whisper writes where nobody speaks, and what listening costs.

Offline (``streamd transcribe``'s pipeline, in process) and live (a real ``streamd serve`` fed at
real-time pace over protocol v1), on the non-speech set (music, animals, noise, near silence):
words out and files with any text, which should both be 0. Then:

- the same VAD settings on the dev corpus: offline greedy WER (the price of gating speech);
- daemon CPU on 60 s of a music loop and on 60 s of silence, one live stream each;
- the neural detector's own CPU per audio second (in process, on every file).

    python benchmarks/nonspeech.py                      # the defaults (webrtcvad + Silero)
    python benchmarks/nonspeech.py --speech-detector off  # webrtcvad alone, as before
    python benchmarks/nonspeech.py --only offline|live|cpu

Scoring as the corpus READMEs say: Whisper's English normaliser on both sides, then jiwer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SHARED, corpus_wer, reference
from stream_ws import cpu_seconds, replay, start_daemon

from streamd.audio import load_audio
from streamd.vad import VadConfig, detector_cpu_seconds, plan_windows, speech_regions

NONSPEECH = sorted((SHARED / "nonspeech").glob("*.wav"))
DEV = sorted((SHARED / "dev").glob("*.wav"))
MUSIC_LOOP = SHARED / "nonspeech" / "music_alley_loop.wav"


def offline(vad: VadConfig, use_vad: bool) -> None:
    from whisper_engine.engine import Engine
    from whisper_engine.transcribe import TranscribeOptions, transcribe

    engine = Engine.load()
    options = TranscribeOptions(beam_size=1, word_timestamps=False)
    words, with_text = 0, []
    for path in NONSPEECH:
        audio = load_audio(path)
        spans = plan_windows(speech_regions(audio, vad)) if use_vad else None
        text = transcribe(engine, audio, options, spans=spans).text
        if text.strip():
            words += len(text.split())
            with_text.append(f"{path.stem}: {text.strip()!r}")
    minutes = sum(len(load_audio(p)) for p in NONSPEECH) / 16000 / 60
    print(f"offline non-speech: {words} words ({words / minutes:.2f}/min), {len(with_text)} of {len(NONSPEECH)} files")
    for line in with_text:
        print("   ", line)
    hyps = []
    for path in DEV:
        audio = load_audio(path)
        spans = plan_windows(speech_regions(audio, vad)) if use_vad else None
        hyps.append(transcribe(engine, audio, options, spans=spans).text)
    wer = 100 * corpus_wer([reference(path) for path in DEV], hyps)
    print(f"offline dev corpus: greedy WER {wer:.2f}% on {len(DEV)} files")


def daemon_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(update_s=0.5, threads=1, workers=1, streams=4, backend="cpu", max_batch=1,
                              cuda_device=None, extra=["--speech-detector", args.speech_detector])  # fmt: skip


async def live(args: argparse.Namespace) -> None:
    proc, url = start_daemon(daemon_args(args))
    try:
        words, with_text, pending = 0, [], list(NONSPEECH)
        while pending:  # four at a time: real-time pace, within two cores even without the detector
            batch, pending = pending[:4], pending[4:]
            results = await asyncio.gather(*(replay(url, load_audio(p), p.stem) for p in batch))
            for path, r in zip(batch, results, strict=True):
                if r["text"].strip():
                    words += len(r["text"].split())
                    with_text.append(f"{path.stem}: {r['text'].strip()!r}")
        minutes = sum(len(load_audio(p)) for p in NONSPEECH) / 16000 / 60
        print(f"live non-speech: {words} words ({words / minutes:.2f}/min), {len(with_text)} of {len(NONSPEECH)} files")
        for line in with_text:
            print("   ", line)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def cost(args: argparse.Namespace) -> None:
    proc, url = start_daemon(daemon_args(args))
    try:
        loop = load_audio(MUSIC_LOOP)
        music = np.tile(loop, int(np.ceil(args.seconds * 16000 / len(loop))))[: round(args.seconds * 16000)]
        silence = np.random.default_rng(0).normal(0, 3e-4, round(args.seconds * 16000)).astype(np.float32)
        await replay(url, load_audio(NONSPEECH[0])[:16000], "warm-up")  # first-use costs out of the way
        for name, audio in (("music loop", music), ("silence", silence)):
            c0 = cpu_seconds(proc.pid)
            r = await replay(url, audio, name.replace(" ", "-"))
            used = cpu_seconds(proc.pid) - c0
            print(f"live {name} {args.seconds:.0f} s: daemon CPU {used:.2f} s = {100 * used / args.seconds:.2f}% "
                  f"of a core, {r['finals']} finals")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def detector_cost(vad: VadConfig) -> None:
    total = 0.0
    started = time.process_time()
    for path in [*NONSPEECH, *DEV]:
        audio = load_audio(path)
        total += len(audio) / 16000
        speech_regions(audio, vad)
    gate_s = time.process_time() - started
    spent, judged = detector_cpu_seconds()
    print(f"VAD gate on {total:.0f} s of audio: {gate_s:.2f} s CPU = {100 * gate_s / total:.2f}% of a core; the "
          f"detector ran on {judged:.0f} s of it for {spent:.2f} s = {100 * spent / max(judged, 1e-9):.2f}% "
          f"of a core while on")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speech-detector", default="silero", choices=["silero", "off"])
    p.add_argument("--no-vad", action="store_true", help="offline: decode whole files (no VAD at all)")
    p.add_argument("--only", choices=["offline", "live", "cpu"])
    p.add_argument("--seconds", type=float, default=60.0, help="length of the music and silence streams")
    args = p.parse_args()
    if not NONSPEECH:
        raise SystemExit(f"no corpus at {SHARED}")
    vad = VadConfig(detector=args.speech_detector)
    if args.only in (None, "cpu"):
        detector_cost(vad)
    if args.only in (None, "offline"):
        offline(vad, not args.no_vad)
    if args.only in (None, "live"):
        asyncio.run(live(args))
    if args.only in (None, "cpu"):
        asyncio.run(cost(args))


if __name__ == "__main__":
    main()
