"""Where the time of one big streaming batch goes: ``Engine.continue_windows`` on 256 windows.

The GPU daemon serves hundreds of streams with one batch per engine run; what the host does
around the device's launches (building masks, the decoder's bookkeeping, word timing per
window) is what held it at p95 2.1 s for 256 streams. This runs the same batched path on
torch's CPU device (``--device cpu``, the default; ``cuda`` on a GPU) and prints the wall time
of each part the engine accounts (``Engine.batch_seconds``):

- ``launch``: the mel and encoder launches of every window;
- ``decode``: the batched greedy decoder (on a GPU this also waits for the launches before it);
- ``align``: the word-alignment pass of every window with words;
- ``words``: turning each window's alignment matrix into timed words (DTW, on the host).

    python benchmarks/batch_host.py [--windows 256] [--device cpu] [--repeat 2]

Windows: cuts of 3 to 15 s from the dev corpus (the repository's test audio without it), half
of them after a forced prefix of their reference's first words, as a stream's later updates are.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from harness import CORPUS, TEST_DATA, reference

from streamd.audio import load_audio
from whisper_engine.backends.cuda import CudaBackend
from whisper_engine.engine import Engine, WindowRequest


def windows(engine: Engine, n: int, seed: int = 0) -> list[WindowRequest]:
    files = sorted(CORPUS.glob("*.wav")) or sorted((TEST_DATA / "speech").glob("*.flac"))
    files = [f for f in files if f.with_suffix(".txt").exists()]  # (a test clip may have no reference)
    audios = [(load_audio(f), reference(f)) for f in files]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        audio, text = audios[i % len(audios)]
        length = min(len(audio), round(rng.uniform(3.0, 15.0) * 16000))
        if i % 2:  # from the recording's start, after its first words (a later update of a stream)
            start, prefix = 0, engine.tokenizer.encode(" " + " ".join(text.split()[:3]))
        else:  # anywhere, nothing forced (a stream's first decode)
            start, prefix = int(rng.integers(0, len(audio) - length + 1)), []
        out.append(WindowRequest(audio[start : start + length], [], prefix, 500))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=256)
    p.add_argument("--device", default="cpu", help="torch device of the cuda backend (default: cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU device")
    p.add_argument("--repeat", type=int, default=2, help="batches timed after one warm-up batch")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = Engine.load()
    engine = Engine(cpu.weights, CudaBackend(cpu.weights, device=args.device), cpu.tokenizer)
    requests = windows(engine, args.windows)
    audio_s = sum(len(r.audio) for r in requests) / 16000
    engine.continue_windows(requests[:8])  # warm-up: first-call allocations
    print(f"# {args.windows} windows, {audio_s:.0f} s of audio; device {engine.backend.devices['decoder']}, "
          f"torch {torch.__version__}, {args.threads} threads; {platform.processor() or platform.machine()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    print("| batch | total s | launch s | decode s | align s | words s | words ms per window |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for run in range(1, args.repeat + 1):
        engine.batch_seconds = dict.fromkeys(engine.batch_seconds, 0.0)
        started = time.perf_counter()
        engine.continue_windows(requests)
        total = time.perf_counter() - started
        parts = engine.batch_seconds
        print(
            f"| {run} | {total:.2f} | {parts['launch']:.2f} | {parts['decode']:.2f} | {parts['align']:.2f} "
            f"| {parts['words']:.2f} | {1000 * parts['words'] / args.windows:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
