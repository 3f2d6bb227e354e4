"""The file API (``POST /v1/audio/transcriptions``) of a daemon process, as a client sees it.

Three measurements, each a table (run one at a time on a quiet machine):

- **latency**: one client (the ``openai`` SDK), the dev recordings of 8-15 s, each posted
  ``--repeat`` times: median and p90 from the request sent to the answer received, with
  ``response_format=json`` and with ``verbose_json`` + word timestamps;
- **throughput**: ``--clients`` clients posting the whole dev corpus between them: files per
  second and times real time, beside faster-whisper (the same tiny.en weights, int8, 2 threads)
  transcribing the same files in one process;
- **live beside files**: one live stream of the dev long-form at real-time pace, alone and while
  a client posts the dev recordings back to back: the stream's final latency.

    python benchmarks/file_api.py [--repeat 3] [--clients 4] [--only latency|throughput|live]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from harness import CORPUS, LONG_FORM, ROOT, DaemonProcess, corpus_wer, reference, stream_audio

from streamd.audio import load_audio

FASTER_WHISPER = r"""
import json, sys, time
from faster_whisper import WhisperModel
from whisper_engine.weights import default_model_path
model = WhisperModel(str(default_model_path()), device="cpu", compute_type="int8", cpu_threads=2)
started = time.perf_counter()
for f in sys.argv[1:]:
    segments, info = model.transcribe(f, beam_size=1, language="en")
    text = "".join(s.text for s in segments).strip()
    print(json.dumps({"file": f, "text": text, "audio_s": info.duration}), flush=True)
print(json.dumps({"wall_s": time.perf_counter() - started}), flush=True)
"""


def duration(path: Path) -> float:
    return sf.info(str(path)).duration


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def client(base: str):
    import openai

    return openai.AsyncOpenAI(base_url=base + "/v1", api_key="benchmark", max_retries=0, timeout=600)


async def post(api, path: Path, **fields) -> tuple[float, str]:
    data = path.read_bytes()
    started = time.perf_counter()
    answer = await api.audio.transcriptions.create(file=(path.name, data), model="whisper-1", **fields)
    return time.perf_counter() - started, answer.text


async def latency(base: str, sets: dict[str, list[Path]], repeat: int) -> None:
    api = client(base)
    await post(api, next(iter(sets.values()))[0])  # warm-up: the first request pays for allocations
    print(f"\n## Latency: one client, each file {repeat} times\n")
    print("| files | response_format | requests | audio s each (mean) | median s | p90 s | max s | WER % |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    words = {"response_format": "verbose_json", "timestamp_granularities": ["word"]}
    for label, files in sets.items():
        for name, fields in (("json", {}), ("verbose_json + words", words)):
            times, texts = [], {}
            for _ in range(repeat):
                for f in files:
                    seconds, text = await post(api, f, **fields)
                    times.append(seconds)
                    texts[f] = text
            wer = corpus_wer([reference(f) for f in files], [texts[f] for f in files])
            mean_s = sum(duration(f) for f in files) / len(files)
            print(f"| {label} | {name} | {len(times)} | {mean_s:.1f} | {pct(times, 50):.3f} | {pct(times, 90):.3f} "
                  f"| {max(times):.3f} | {100 * wer:.2f} |", flush=True)  # fmt: skip


async def throughput(base: str, files: list[Path], clients: int) -> None:
    api = client(base)
    await post(api, files[0])
    queue = list(files)
    texts: dict[Path, str] = {}

    async def worker() -> None:
        while queue:
            f = queue.pop(0)
            _, texts[f] = await post(api, f)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - started
    audio = sum(duration(f) for f in files)
    wer = corpus_wer([reference(f) for f in files], [texts[f] for f in files])
    fw = subprocess.run([sys.executable, "-c", FASTER_WHISPER, *map(str, files)], capture_output=True, text=True,
                        cwd=ROOT, check=True)  # fmt: skip
    lines = [json.loads(line) for line in fw.stdout.splitlines()]
    fw_wall = lines[-1]["wall_s"]
    fw_wer = corpus_wer([reference(r["file"]) for r in lines[:-1]], [r["text"] for r in lines[:-1]])
    print(f"\n## Throughput: the dev corpus ({len(files)} files, {audio:.0f} s of audio)\n")
    print("| system | wall s | files/s | x realtime | WER % |")
    print("|---|---:|---:|---:|---:|")
    print(f"| streamd file API, {clients} clients | {wall:.2f} | {len(files) / wall:.2f} | {audio / wall:.1f} "
          f"| {100 * wer:.2f} |")  # fmt: skip
    print(f"| faster-whisper int8, one process (model loaded before the clock) | {fw_wall:.2f} "
          f"| {len(files) / fw_wall:.2f} | {audio / fw_wall:.1f} | {100 * fw_wer:.2f} |", flush=True)  # fmt: skip


async def _post_until(stop: asyncio.Event, api, files: list[Path], done: list[int]) -> None:
    """Post the files one after another, round and round, until ``stop``."""
    while not stop.is_set():
        for f in files:
            if stop.is_set():
                return
            await post(api, f)
            done[0] += 1


async def live(d: DaemonProcess, files: list[Path]) -> None:
    audio = load_audio(LONG_FORM)
    print(f"\n## A live stream of the long-form ({len(audio) / 16000:.0f} s, real-time pace) beside files\n")
    print("| files posted meanwhile | finals | final med s | p90 s | max s | files done | WER % |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for with_files in (False, True, False, True):
        done = [0]
        stop = asyncio.Event()
        task = asyncio.create_task(_post_until(stop, client(d.http), files, done)) if with_files else None
        result = await stream_audio(d.url, audio, f"live-{int(with_files)}")
        stop.set()
        if task is not None:
            await task
        done = done[0]
        lat = [x for _, x in result.final_latencies]
        wer = corpus_wer([reference(LONG_FORM)], [result.text])
        print(f"| {'yes' if with_files else 'no'} | {len(lat)} | {pct(lat, 50):.2f} | {pct(lat, 90):.2f} "
              f"| {max(lat, default=float('nan')):.2f} | {done} | {100 * wer:.2f} |", flush=True)  # fmt: skip


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--only", choices=["latency", "throughput", "live"])
    args = p.parse_args()
    corpus = sorted(CORPUS.glob("*.wav"))
    if not corpus:
        raise SystemExit(f"no recordings under {CORPUS}")
    files = [f for f in corpus if 8.0 <= duration(f) <= 15.0]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
          "2 cores; a daemon with default settings (engine and file threads, 1 BLAS thread each)")  # fmt: skip
    with DaemonProcess(["--retention-days", "0"]) as d:
        if args.only in (None, "latency"):
            short = [f for f in corpus if duration(f) < 30.0]
            sets = {f"the {len(files)} of 8-15 s": files, f"all {len(short)} under 30 s": short}
            await latency(d.http, sets, args.repeat)
        if args.only in (None, "throughput"):
            await throughput(d.http, corpus, args.clients)
        if args.only in (None, "live"):
            await live(d, files)
        if d.problems():
            print("\ndaemon errors:\n" + "\n".join(d.problems()))


if __name__ == "__main__":
    asyncio.run(main())
