"""Offline throughput of the cuda backend: the dev corpus as one batch, x realtime and WER.

Every file is cut at its pauses (webrtcvad, as `streamd transcribe --vad` plans windows) into
windows of at most 30 s. All windows of all files then go through the device together: one
batched mel, ``encode_batch`` (windows of different lengths, padded to frame buckets with a mask)
and ``decode_greedy_batch`` (greedy, no timestamps, every stream's step in one CUDA-graph launch).
Windows are independent (no previous-text prompt, no temperature fallback, no loop guard), which
is what makes the corpus one batch; the WER column shows what that costs against the engine.

Wall time runs from audio in host memory to text on the host; model load and one warm-up pass
(which captures the CUDA graphs) are left out and reported apart. ``--copies K`` repeats the
corpus K times in the batch, to fill a large GPU.

    python benchmarks/gpu_offline.py                         # cuda, the dev corpus, best of 3 runs
    python benchmarks/gpu_offline.py --copies 8 --repeat 5
    python benchmarks/gpu_offline.py --device cpu --limit 3 --repeat 1   # smoke test, no GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _gpu import gpu_memory, load, reset_peak, sync, token_budget, window_mels
from harness import CORPUS, corpus_wer, reference

from streamd.audio import load_audio
from streamd.vad import plan_windows, speech_regions
from whisper_engine.mel import SAMPLE_RATE

MAX_WINDOW_S = 30.0


@dataclass
class Pass:
    wall_s: float
    mel_s: float
    encoder_s: float
    decoder_s: float
    texts: list[str]


def cut_windows(audio: np.ndarray) -> list[np.ndarray]:
    """Speech windows of at most 30 s, cut in pauses; a longer stretch of speech is cut every 30 s."""
    out = []
    for start_s, end_s in plan_windows(speech_regions(audio), max_s=MAX_WINDOW_S):
        first, last = round(start_s * SAMPLE_RATE), round(end_s * SAMPLE_RATE)
        step = round(MAX_WINDOW_S * SAMPLE_RATE)
        out += [audio[i : min(i + step, last)] for i in range(first, last, step)]
    return [w for w in out if len(w) >= SAMPLE_RATE // 10]


def run_pass(backend, tok, rules, windows: list[np.ndarray]) -> Pass:
    sync(backend)
    started = time.perf_counter()
    mels = window_mels(backend, windows)
    sync(backend)
    t_mel = time.perf_counter()
    features = backend.encode_batch(mels)
    sync(backend)
    t_enc = time.perf_counter()
    prompt = rules.initial_tokens(tok, n_text_ctx=backend.dims.n_text_ctx)
    tokens = backend.decode_greedy_batch(
        features, [prompt] * len(windows), [token_budget(w) for w in windows], rules=rules
    )
    texts = [tok.decode(r.tokens) for r in tokens]
    done = time.perf_counter()
    return Pass(done - started, t_mel - started, t_enc - t_mel, done - t_enc, texts)


def wer(files: list[Path], texts: list[str]) -> float:
    return corpus_wer([reference(f) for f in files], texts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, help="recordings (default: the dev corpus)")
    p.add_argument("--device", default="cuda", help="torch device: cuda (default), cuda:1, cpu for a smoke test")
    p.add_argument("--model", help="model folder (default: the bundled tiny.en)")
    p.add_argument("--copies", type=int, default=1, help="repeat the corpus this many times in the batch")
    p.add_argument("--repeat", type=int, default=3, help="timed passes after the warm-up; the best is shown")
    p.add_argument("--limit", type=int, help="only the first N files")
    args = p.parse_args()
    files = args.files or sorted(CORPUS.glob("*.wav"))
    files = files[: args.limit] if args.limit else files
    if not files:
        raise SystemExit(f"no recordings under {CORPUS}")

    started = time.perf_counter()
    backend, tok, rules = load(args.device, args.model)
    sync(backend)
    load_s = time.perf_counter() - started
    audio_s = 0.0
    windows: list[np.ndarray] = []
    owner: list[int] = []  # file index of each window
    for i, f in enumerate(files):
        audio = load_audio(f)
        audio_s += len(audio) / SAMPLE_RATE
        cut = cut_windows(audio)
        windows += cut
        owner += [i] * len(cut)
    windows, owner = windows * args.copies, owner * args.copies

    base, _ = gpu_memory()
    started = time.perf_counter()
    run_pass(backend, tok, rules, windows)  # warm-up: CUDA graph capture, cuBLAS and cuFFT plans
    warm_s = time.perf_counter() - started
    passes = []
    reset_peak()
    for i in range(args.repeat):
        passes.append(run_pass(backend, tok, rules, windows))
        print(f"  [{i + 1}/{args.repeat}] {passes[-1].wall_s:.3f} s", file=sys.stderr)
    _, peak = gpu_memory()
    best = min(passes, key=lambda r: r.wall_s)
    one_copy = len(windows) // args.copies  # every copy decodes the same; score the first
    per_file = [
        " ".join(t.strip() for t, o in zip(best.texts[:one_copy], owner[:one_copy], strict=True) if o == i)
        for i in range(len(files))
    ]
    score = wer(files, per_file)
    total_audio = audio_s * args.copies

    print(f"# {len(files)} files, {audio_s:.1f} s of audio x {args.copies} copies; {len(windows)} windows")
    print(f"# device: {backend.devices['decoder']}, {backend.dtype}; torch {__import__('torch').__version__}")
    print(f"# host: {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"model load {load_s:.1f} s, warm-up pass {warm_s:.1f} s"
    )
    print()
    print(
        "| device | windows | audio s | wall s (best) | wall s (median) | x realtime | mel s | encoder s | decoder s "
        "| WER % | peak GPU MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    median = statistics.median(r.wall_s for r in passes)
    peak_mib = f"{(peak - base) / 2**20:.0f}" if peak else "-"
    print(
        f"| {backend.devices['decoder']} | {len(windows)} | {total_audio:.1f} | {best.wall_s:.3f} | {median:.3f} "
        f"| {total_audio / best.wall_s:.0f} | {best.mel_s:.3f} | {best.encoder_s:.3f} | {best.decoder_s:.3f} "
        f"| {100 * score:.2f} | {peak_mib} |"
    )


if __name__ == "__main__":
    main()
