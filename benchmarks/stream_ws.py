"""Streaming benchmark over the wire: real `streamd serve`, protocol v1, real-time pace.

Starts the daemon as a subprocess (or uses --url), replays each recording at the pace it was
spoken in 100 ms frames, and prints per file and overall:

- final latency: when a final arrives minus when the audio at the final's ``end`` was sent;
- partial latency: likewise for partials (their ``end``);
- WER of the joined finals against the reference (jiwer + Whisper's English normaliser);
- daemon CPU seconds per audio second (/proc of the daemon process, all its threads);
- with ``--silence S``: daemon CPU over S seconds of a silent room (2% of a core is the bar).

    python benchmarks/stream_ws.py [FILE...] [--streams N] [--silence 60] [--update-s 0.5]
    python benchmarks/stream_ws.py --backend cuda --max-batch 64 --streams 256   # a GPU server

With ``--backend cuda`` the daemon batches the streams' windows (``--max-batch``); the run also
prints the batch sizes and the device memory the daemon reports (/healthz).

Default file: the 3-minute Shakespeare reading of the dev corpus. ``--joined``: the corpus's
shorter recordings one after another as one stream, 1 s of a quiet room between them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from harness import LONG_FORM, corpus_wer, joined_shorter_files, reference
from websockets.asyncio.client import connect

from streamd.audio import load_audio

DEFAULT = LONG_FORM
CHUNK_S = 0.1
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def replay(url: str, audio: np.ndarray, source: str) -> dict:
    """One client streaming ``audio`` in real time; returns what arrived and when."""
    chunk = round(CHUNK_S * 16000)
    sent_at: list[float] = []  # wall time when chunk i (ending at stream time (i+1)*CHUNK_S) was sent
    finals, partials = [], []
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "protocol": 1, "source": source,
                                  "audio": {"encoding": "pcm_f32le", "sample_rate": 16000}}))  # fmt: skip

        async def receive() -> None:
            async for frame in ws:
                msg, now = json.loads(frame), time.perf_counter()
                if msg["type"] == "final":
                    finals.append((now, msg))
                elif msg["type"] == "partial":
                    partials.append((now, msg))
                elif msg["type"] == "error":
                    print(f"  {source}: error {msg}", file=sys.stderr)

        receiving = asyncio.create_task(receive())
        t0 = time.perf_counter()
        for i in range(0, len(audio), chunk):
            delay = t0 + i / 16000 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(audio[i : i + chunk].astype("<f4").tobytes())
            sent_at.append(time.perf_counter())
        await ws.send(json.dumps({"type": "stop"}))
        await receiving

    def latency(arrived: float, end: float) -> float:
        i = min(max(int(np.ceil(end / CHUNK_S)) - 1, 0), len(sent_at) - 1)
        return arrived - sent_at[i]

    return {
        "final_latency": [latency(t, m["end"]) for t, m in finals],
        "partial_latency": [latency(t, m["end"]) for t, m in partials],
        "text": " ".join(m["text"] for _, m in finals),
        "finals": len(finals),
        "partials": len(partials),
    }


def fetch_health(url: str) -> dict | None:
    import urllib.request

    base = url.replace("ws://", "http://").split("/v1/")[0]
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            return json.load(r)
    except OSError:
        return None


def start_daemon(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "streamd", "serve", "--port", "0", "--log-level", "warning",
           "--update-s", str(args.update_s), "--threads", str(args.threads), "--workers", str(args.workers),
           "--max-streams", str(max(16, args.streams)), "--max-connections", str(max(64, args.streams + 8)),
           "--backend", args.backend, "--max-batch", str(args.max_batch)]  # fmt: skip
    if args.cuda_device:
        cmd += ["--cuda-device", args.cuda_device]
    cmd += getattr(args, "extra", None) or []
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := re.search(r"serving .* on http://([\d.]+):(\d+)", line):
            # Keep draining the daemon's stderr: a full pipe would block its logging.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, f"ws://{m[1]}:{m[2]}/v1/stream"
        print(line, end="", file=sys.stderr)
    raise SystemExit(f"daemon did not start: {proc.wait()}")


async def main_async(args: argparse.Namespace) -> None:
    proc, url = (None, args.url) if args.url else start_daemon(args)
    pid = args.pid or (proc.pid if proc else None)
    try:
        if args.silence and pid:
            silence = np.random.default_rng(0).normal(0, 3e-4, round(args.silence * 16000)).astype(np.float32)
            c0 = cpu_seconds(pid)
            await replay(url, silence, "silence")
            used = cpu_seconds(pid) - c0
            print(f"silence {args.silence:.0f} s: daemon CPU {used:.2f} s = {100 * used / args.silence:.2f}% of a core")
        rows = []
        recordings = [(Path(path).stem, lambda path=path: (load_audio(path), reference(path))) for path in args.files]
        if args.joined:
            audio, ref, n = joined_shorter_files()
            recordings = [(f"{n} shorter dev files, joined", lambda: (audio, ref))]
        for name, load in recordings:
            audio, ref = load()
            c0 = cpu_seconds(pid) if pid else 0.0
            results = await asyncio.gather(*(replay(url, audio, f"bench-{i}") for i in range(args.streams)))
            cpu = (cpu_seconds(pid) - c0) if pid else float("nan")
            audio_s = len(audio) / 16000 * args.streams
            finals = [x for r in results for x in r["final_latency"]]
            partials = [x for r in results for x in r["partial_latency"]]
            wers = [corpus_wer([ref], [r["text"]]) for r in results]
            if args.dump:
                Path(args.dump).mkdir(parents=True, exist_ok=True)
                for i, r in enumerate(results):
                    (Path(args.dump) / f"{name}.{i}.txt").write_text(r["text"] + "\n", encoding="utf-8")
            rows.append((name[:44], len(audio) / 16000, args.streams, len(finals),
                         statistics.median(finals), percentile(finals, 90), percentile(finals, 95), max(finals),
                         statistics.median(partials), percentile(partials, 90), 100 * statistics.mean(wers),
                         100 * max(wers), cpu / audio_s))  # fmt: skip
        health = await asyncio.to_thread(fetch_health, url)
        if health:
            e = health["engine"]
            print(
                f"pipeline: engine busy {e['busy_s']:.1f} s over {e['jobs']} jobs; mel frames {e['mel_s']:.2f} s, "
                f"{e['mel_overlap_s']:.2f} s of it while the engine ran; window assembly {e['window_mel_s']:.2f} s"
            )
            if e.get("max_batch", 1) > 1:
                mean = e["jobs"] / max(e["batches"], 1)
                print(
                    f"batching: {e['batches']} engine runs, {mean:.1f} jobs per run on average, largest "
                    f"{e['largest_batch']} (max_batch {e['max_batch']}); devices {health['devices']}"
                )
                print("batch parts, s: " + ", ".join(f"{k} {v:.2f}" for k, v in e.get("batch_s", {}).items()))
            if memory := e.get("device_memory"):
                shown = [f"{k} {v}" if k.endswith("rows") else f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items()]
                print("device memory: " + ", ".join(shown))
        header = ("file", "audio s", "streams", "finals", "final med", "final p90", "final p95", "final max",
                  "partial med", "partial p90", "WER %", "worst WER %", "CPU s/s")  # fmt: skip
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print(f"| {r[0]} | {r[1]:.0f} | {r[2]} | {r[3]} | " + " | ".join(f"{v:.2f}" for v in r[4:]) + " |")
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", default=[str(DEFAULT)])
    p.add_argument("--joined", action="store_true", help="the shorter dev files one after another, as one stream")
    p.add_argument("--url", help="a running daemon's ws://.../v1/stream (default: start one)")
    p.add_argument("--pid", type=int, help="the running daemon's pid, for CPU (with --url)")
    p.add_argument("--streams", type=int, default=1, help="concurrent clients per file, each the same audio")
    p.add_argument("--silence", type=float, default=0.0, metavar="S", help="first measure S seconds of silence")
    p.add_argument("--update-s", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="the daemon's --threads")
    p.add_argument("--workers", type=int, default=1, help="the daemon's --workers")
    p.add_argument("--backend", default="auto", help="the daemon's --backend (cuda: batched across streams)")
    p.add_argument("--cuda-device", help="the daemon's --cuda-device (cuda:N; cpu to try the cuda path without a GPU)")
    p.add_argument("--max-batch", type=int, default=64, help="the daemon's --max-batch (jobs per engine run on cuda)")
    p.add_argument("--dump", metavar="DIR", help="write each stream's joined finals there")
    p.add_argument("--serve-arg", dest="extra", action="append", default=[], metavar="ARG",
                   help="one more daemon argument (repeat: --serve-arg=--speech-detector --serve-arg=off)")  # fmt: skip
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
