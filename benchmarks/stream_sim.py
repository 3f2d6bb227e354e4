"""Streaming policy in simulated real time, without sockets: latency, WER and CPU of Stream.

Audio arrives in 100 ms chunks on a virtual clock; a decode job starts when the stream asks
for one and its result lands when its measured compute time has passed on that clock (audio
keeps arriving meanwhile), exactly as in the daemon, where one job per stream runs off the
event loop. Final latency is the clock when a final lands minus the end of its last word.

    python benchmarks/stream_sim.py [FILE] [--update-s 1.0]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from harness import LONG_FORM, corpus_wer, reference

from streamd.audio import load_audio
from streamd.jobs import run_job
from streamd.stream import Final, Partial, Stream, StreamConfig, UtteranceEnd
from whisper_engine.engine import Engine

CHUNK_S = 0.1


def simulate(engine: Engine, audio: np.ndarray, config: StreamConfig) -> dict:
    stream = Stream(config)
    chunk = round(CHUNK_S * 16000)
    finals: list[tuple[float, Final]] = []
    meta: list[dict] = []  # per final: how it was committed (for live_errors.py)
    utterance_finals = 0  # finals so far in the current utterance
    partials: list[tuple[float, Partial]] = []
    busy_until, pending = 0.0, None  # virtual time when the running job's result lands
    cpu = 0.0

    def land(now: float) -> None:
        nonlocal pending, utterance_finals
        job, words = pending
        pending = None
        window_end = job.offset + len(job.audio) / 16000
        for e in stream.on_result(job, words):
            if isinstance(e, UtteranceEnd):
                utterance_finals = 0
            if isinstance(e, Final):
                finals.append((now, e))
                forced = not e.closes and window_end - job.offset > stream.config.max_window_s
                kind = "closing decode" if e.closes else "forced" if forced else "agreement"
                meta.append({"text": e.text, "kind": kind, "lag": window_end - e.end, "first": utterance_finals == 0})
                utterance_finals += 1
            elif isinstance(e, Partial):
                partials.append((now, e))

    def start(now: float) -> float:
        nonlocal pending, cpu
        job = stream.next_job()
        if job is None:
            return now
        c0, w0 = time.process_time(), time.perf_counter()
        words = run_job(engine, job)
        cpu += time.process_time() - c0
        pending = (job, words)
        return now + (time.perf_counter() - w0)

    for i in range(0, len(audio), chunk):
        now = (i + chunk) / 16000
        if pending is not None and busy_until <= now:
            land(busy_until)
        stream.feed(audio[i : i + chunk])
        if pending is None:
            busy_until = start(now)
    now = len(audio) / 16000
    stream.finish()
    while True:
        if pending is not None:
            now = max(now, busy_until)
            land(now)
        busy_until = start(now)
        if pending is None:
            break
    final_lat = [t - f.end for t, f in finals]
    partial_lat = [t - p.end for t, p in partials]
    return {
        "text": " ".join(f.text for _, f in finals),
        "finals": meta,
        "final_latency": final_lat,
        "partial_latency": partial_lat,
        "cpu_per_audio_s": cpu / (len(audio) / 16000),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", default=str(LONG_FORM))
    p.add_argument("--update-s", type=float, nargs="+", default=[1.0])
    args = p.parse_args()
    engine = Engine.load()
    audio = load_audio(args.file)
    ref = reference(args.file)
    print(f"# {Path(args.file).name}, {len(audio) / 16000:.1f} s; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| update s | final latency median / p90 s | partial latency median / p90 s | WER % | CPU s per audio s |")
    print("|---:|---:|---:|---:|---:|")
    for update in args.update_s:
        r = simulate(engine, audio, replace(StreamConfig(), update_s=update))
        fl, pl = np.array(r["final_latency"]), np.array(r["partial_latency"])
        final = f"{np.median(fl):.2f} / {np.percentile(fl, 90):.2f}"
        partial = f"{np.median(pl):.2f} / {np.percentile(pl, 90):.2f}" if len(pl) else "-"
        wer = 100 * corpus_wer([ref], [r["text"]])
        print(f"| {update} | {final} | {partial} | {wer:.2f} | {r['cpu_per_audio_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
