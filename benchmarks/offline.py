"""Offline benchmark: WER and speed of `streamd transcribe` and faster-whisper on the dev corpus.

Each system runs as its own process over every file, so the wall time includes start-up and
model loading, as a user would see it; peak memory is the child's maximum resident set.

    python benchmarks/offline.py                     # streamd beam 1 and 5, padded variant, faster-whisper
    python benchmarks/offline.py --only streamd --beams 1

faster-whisper runs when it is installed (it is in the dev extra), int8 on 2 threads, with the
same bundled tiny.en weights. Scoring: Whisper's English normaliser on both sides, then jiwer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import CORPUS, corpus_wer, reference

ROOT = Path(__file__).resolve().parents[1]

FASTER_WHISPER = r"""
import json, sys
from faster_whisper import WhisperModel
from whisper_engine.weights import default_model_path
beam = int(sys.argv[1])
model = WhisperModel(str(default_model_path()), device="cpu", compute_type="int8", cpu_threads=2)
for f in sys.argv[2:]:
    segments, info = model.transcribe(f, beam_size=beam, language="en")
    text = "".join(s.text for s in segments).strip()
    print(json.dumps({"file": f, "text": text, "audio_s": info.duration}), flush=True)
"""


@dataclass
class Run:
    system: str
    beam: int
    wer: float
    wall_s: float
    audio_s: float
    peak_mb: float

    @property
    def x_realtime(self) -> float:
        return self.audio_s / self.wall_s


def _run(cmd: list[str]) -> tuple[list[dict], float, float]:
    """Run ``cmd``; return its JSON lines, wall seconds and peak resident MB."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with status {status}")
    return [json.loads(line) for line in out.splitlines() if line.strip()], wall, usage.ru_maxrss / 1024


def _score(results: list[dict]) -> tuple[float, float]:
    refs = [reference(r["file"]) for r in results]
    return corpus_wer(refs, [r["text"] for r in results]), sum(r["audio_s"] for r in results)


def run_streamd(files: list[str], beam: int, extra: list[str]) -> Run:
    cmd = [sys.executable, "-m", "streamd", "transcribe", "--format", "jsonl", "--beam-size", str(beam), *extra, *files]
    results, wall, peak = _run(cmd)
    wer, audio = _score(results)
    name = "streamd" + (" " + " ".join(extra) if extra else "")
    return Run(name, beam, wer, wall, audio, peak)


def run_faster_whisper(files: list[str], beam: int) -> Run:
    results, wall, peak = _run([sys.executable, "-c", FASTER_WHISPER, str(beam), *files])
    wer, audio = _score(results)
    return Run("faster-whisper int8", beam, wer, wall, audio, peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration; the median is shown")
    p.add_argument(
        "--variant", action="append", default=[], metavar="ARGS", help="extra streamd row, e.g. --variant=--vad"
    )
    p.add_argument("--only", choices=["streamd", "faster-whisper"], help="run one system")
    p.add_argument("--no-variants", action="store_true", help="skip the --pad-to-30s and --no-word-timestamps rows")
    args = p.parse_args()
    files = [str(f) for f in sorted(CORPUS.glob("*.wav"))]
    if not files:
        raise SystemExit(f"no recordings under {CORPUS}")
    try:
        import faster_whisper  # noqa: F401

        have_fw = True
    except ImportError:
        have_fw = False

    # Each configuration runs --repeat times, interleaved with the others so that a slow spell
    # of a shared machine hits every system alike; the table shows the median wall time.
    configs: list[tuple[int, Callable[[], Run]]] = []
    for beam in args.beams:
        if args.only != "faster-whisper":
            configs.append((beam, lambda b=beam: run_streamd(files, b, [])))
            if not args.no_variants and beam == 1:
                configs.append((beam, lambda b=beam: run_streamd(files, b, ["--pad-to-30s"])))
                configs.append((beam, lambda b=beam: run_streamd(files, b, ["--no-word-timestamps"])))
            for extra in args.variant:
                configs.append((beam, lambda b=beam, e=extra: run_streamd(files, b, e.split())))
        if args.only != "streamd" and have_fw:
            configs.append((beam, lambda b=beam: run_faster_whisper(files, b)))
    trials: list[list[Run]] = [[] for _ in configs]
    for i in range(args.repeat):
        for trial, (_, make) in zip(trials, configs, strict=True):
            run = make()
            trial.append(run)
            print(f"  [{i + 1}/{args.repeat}] {run.system} beam {run.beam}: {run.wall_s:.1f} s", file=sys.stderr)
    runs = [sorted(trial, key=lambda r: r.wall_s)[len(trial) // 2] for trial in trials]

    base = {r.beam: r for r in runs if r.system.startswith("faster-whisper")}
    print(f"# dev corpus: {len(files)} files, {runs[0].audio_s:.1f} s of speech")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {stamp}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
    print()
    print(f"# median of {args.repeat} runs per row")
    print("| system | beam | WER % | wall s | x realtime | speed vs faster-whisper (same beam) | peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        ref = base.get(r.beam)
        ratio = f"{ref.wall_s / r.wall_s:.2f}x" if ref else "-"
        row = [r.system, r.beam, f"{100 * r.wer:.2f}", f"{r.wall_s:.1f}", f"{r.x_realtime:.1f}", ratio]
        print("| " + " | ".join(str(c) for c in [*row, f"{r.peak_mb:.0f}"]) + " |")


if __name__ == "__main__":
    main()
