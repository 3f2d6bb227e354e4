"""Load generator: N live streams of dev speech at real-time pace into the batched cuda backend.

In-process, no sockets. Each stream plays the dev corpus's utterances back to back (a file is an
utterance; longer files are cut every 20 s; 0.5 s of silence between), each stream from its own
random point, so streams do not line up. As the daemon does, every 0.5 s of new speech a stream's
current utterance so far is a window due for decoding (from 1 s of speech on), and when an
utterance's last sample has arrived its final window is due. One engine loop takes the newest due
window of every stream (a stream that waited decodes its newest audio, as the daemon's scheduler
builds jobs when the engine is free), computes their mels in one batch, encodes them in one
``encode_batch`` and decodes them in one ``decode_greedy_batch``, then goes round again.

Final latency is the wall time from an utterance's last sample being "sent" to its final decode
finishing. For each N: p50/p95/max final latency, engine rounds, mean windows per round, the
engine's busy share, and GPU memory per stream (peak allocated during the run above what was
allocated before it, over N). The largest N whose p95 stays within --target (1.5 s) is found by
doubling from --start, then bisecting.

Not simulated: the commit policy (every window decodes its utterance from its start, with no
committed prefix, so the decoder does more work than the daemon's), the word-alignment pass, VAD,
websockets. So the N found is an estimate of the engine's capacity, not the daemon's.

    python benchmarks/gpu_load.py                              # search N on the GPU
    python benchmarks/gpu_load.py --streams 256 512            # given load levels only
    python benchmarks/gpu_load.py --device cpu --streams 2 --duration 8 --warmup 2   # smoke test
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from _gpu import gpu_memory, load, reset_peak, sync, token_budget, window_mels
from harness import CORPUS

from streamd.audio import load_audio
from whisper_engine.mel import SAMPLE_RATE

UTTERANCE_MAX_S = 20.0
GAP_S = 0.5
UPDATE_S = 0.5
FIRST_WINDOW_S = 1.0
MIN_WINDOW_FRAMES = 500  # the daemon's 5 s encoder window floor for streams


@dataclass
class Utterance:
    start: float  # seconds on the stream's own clock
    audio: np.ndarray

    @property
    def end(self) -> float:
        return self.start + len(self.audio) / SAMPLE_RATE


@dataclass
class Stream:
    """One simulated client: its clock runs ``phase`` seconds ahead of the run's."""

    phase: float
    utterances: list[Utterance]
    next_final: int = 0  # index of the first utterance whose final is not done
    last_window: float = -1.0  # stream time of the last partial window's end
    finals: list[tuple[float, float]] = field(default_factory=list)  # (due wall time, done wall time)


def utterances(files) -> list[np.ndarray]:
    """The corpus as utterances of at most ``UTTERANCE_MAX_S``."""
    out = []
    for f in files:
        audio = load_audio(f)
        step = round(UTTERANCE_MAX_S * SAMPLE_RATE)
        out += [audio[i : i + step] for i in range(0, len(audio), step) if len(audio) - i > SAMPLE_RATE // 2]
    return out


def make_streams(n: int, pieces: list[np.ndarray], horizon_s: float, rng: np.random.Generator) -> list[Stream]:
    """Streams whose utterance schedules cover ``horizon_s`` seconds from a random start."""
    cycle = sum(len(p) / SAMPLE_RATE + GAP_S for p in pieces)
    streams = []
    for _ in range(n):
        phase = float(rng.uniform(0, cycle))
        order = list(rng.permutation(len(pieces)))
        t, schedule, k = 0.0, [], 0
        while t < phase + horizon_s + 30:
            piece = pieces[order[k % len(order)]]
            schedule.append(Utterance(t, piece))
            t += len(piece) / SAMPLE_RATE + GAP_S
            k += 1
        s = Stream(phase, schedule)
        s.next_final = next(i for i, u in enumerate(schedule) if u.end > phase)  # ends after the run starts
        streams.append(s)
    return streams


@dataclass
class Trial:
    streams: int
    finals: int
    p50: float
    p95: float
    max: float
    rounds: int
    mean_batch: float
    busy: float
    mem_per_stream: float  # bytes; 0 without CUDA


def due_windows(streams: list[Stream], now: float, stop_new: float) -> list[tuple[int, np.ndarray, int | None, float]]:
    """The newest due window of every stream: (stream, audio, utterance index if final, due run time).
    From ``stop_new`` on, nothing new becomes due, so the run drains and ends."""
    due = []
    for i, s in enumerate(streams):
        t = now + s.phase
        u = s.utterances[s.next_final]
        if u.end <= t and u.end - s.phase <= stop_new:  # the utterance has ended: its final is due
            due.append((i, u.audio, s.next_final, u.end - s.phase))
        elif now < stop_new and u.start + FIRST_WINDOW_S <= t and t - s.last_window >= UPDATE_S:
            n = round((t - u.start) * SAMPLE_RATE)
            s.last_window = t
            due.append((i, u.audio[:n], None, t - s.phase))
    return due


def run_trial(backend, tok, rules, pieces, n: int, duration: float, warmup: float, seed: int) -> Trial:
    rng = np.random.default_rng(seed)
    streams = make_streams(n, pieces, warmup + duration, rng)
    prompt = rules.initial_tokens(tok, n_text_ctx=backend.dims.n_text_ctx)
    base, _ = gpu_memory()
    reset_peak()
    rounds, windows, busy = 0, 0, 0.0
    t0 = time.perf_counter()
    end = warmup + duration
    latencies: list[float] = []
    while True:
        now = time.perf_counter() - t0
        due = due_windows(streams, now, end)
        if not due:
            if now >= end:
                break
            time.sleep(0.005)
            continue
        started = time.perf_counter()
        mels = window_mels(backend, [a for _, a, _, _ in due], MIN_WINDOW_FRAMES)
        features = backend.encode_batch(mels)
        backend.decode_greedy_batch(features, [prompt] * len(due), [token_budget(a) for _, a, _, _ in due], rules=rules)
        sync(backend)
        done = time.perf_counter()
        busy += done - started
        rounds += 1
        windows += len(due)
        for i, _, final, due_at in due:
            if final is None:
                continue
            s = streams[i]
            s.next_final += 1
            s.last_window = -1.0
            if due_at >= warmup:
                latencies.append(done - t0 - due_at)
    _, peak = gpu_memory()
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return Trial(
        streams=n,
        finals=len(latencies),
        p50=float(np.percentile(lat, 50)),
        p95=float(np.percentile(lat, 95)),
        max=float(lat.max()),
        rounds=rounds,
        mean_batch=windows / max(rounds, 1),
        busy=busy / (time.perf_counter() - t0),
        mem_per_stream=(peak - base) / n if peak else 0.0,
    )


def warm_up(backend, tok, rules, pieces, up_to: int) -> None:
    """Capture the decoder's CUDA graphs for every batch bucket up to ``up_to`` before timing."""
    prompt = rules.initial_tokens(tok, n_text_ctx=backend.dims.n_text_ctx)
    if not backend.use_graphs:
        return
    for b in backend.batch_buckets:
        if b > max(up_to, 1):
            break
        for seconds in (3.0, 12.0, 20.0):  # short, middle and long windows: each audio bucket
            audios = [pieces[k % len(pieces)][: round(seconds * SAMPLE_RATE)] for k in range(b)]
            features = backend.encode_batch(window_mels(backend, audios, MIN_WINDOW_FRAMES))
            backend.decode_greedy_batch(features, [prompt] * b, 120, rules=rules)
    sync(backend)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="torch device: cuda (default), cuda:1, cpu for a smoke test")
    p.add_argument("--model", help="model folder (default: the bundled tiny.en)")
    p.add_argument("--streams", type=int, nargs="*", help="run these load levels only (no search)")
    p.add_argument("--start", type=int, default=16, help="first N of the search")
    p.add_argument("--max-streams", type=int, default=2048, help="the search stops here")
    p.add_argument("--target", type=float, default=1.5, help="p95 final latency bound, seconds")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per load level")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds run before measuring, per load level")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    files = sorted(CORPUS.glob("*.wav"))
    if not files:
        raise SystemExit(f"no recordings under {CORPUS}")
    backend, tok, rules = load(args.device, args.model)
    pieces = utterances(files)
    trials: list[Trial] = []

    def trial(n: int) -> Trial:
        warm_up(backend, tok, rules, pieces, n)
        t = run_trial(backend, tok, rules, pieces, n, args.duration, args.warmup, args.seed)
        ok = "ok" if t.p95 <= args.target else "over"
        print(f"  N={n}: p50 {t.p50:.2f} s, p95 {t.p95:.2f} s ({ok}), {t.finals} finals", file=sys.stderr)
        trials.append(t)
        return t

    best = None
    if args.streams:
        for n in args.streams:
            if trial(n).p95 <= args.target:
                best = max(best or 0, n)
    else:
        n, bad = args.start, None
        while n <= args.max_streams:
            if trial(n).p95 > args.target:
                bad = n
                break
            best = n
            n *= 2
        if best is not None and bad is not None:
            while bad - best > max(1, best // 16):
                mid = (best + bad) // 2
                if trial(mid).p95 <= args.target:
                    best = mid
                else:
                    bad = mid

    print(
        f"# {len(pieces)} utterances from {len(files)} dev files; update every {UPDATE_S} s; "
        f"{args.duration:.0f} s measured after {args.warmup:.0f} s per level"
    )
    print(
        f"# device: {backend.devices['decoder']}, {backend.dtype}; torch {__import__('torch').__version__}; "
        f"host {platform.processor() or platform.machine()}"
    )
    print(f"# static decoder state: {backend.decode_state_bytes_per_stream() / 2**20:.1f} MiB per stream")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print()
    print("| streams | finals | p50 s | p95 s | max s | rounds | windows/round | engine busy % | GPU MiB/stream |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in sorted(trials, key=lambda t: t.streams):
        mem = f"{t.mem_per_stream / 2**20:.1f}" if t.mem_per_stream else "-"
        print(
            f"| {t.streams} | {t.finals} | {t.p50:.2f} | {t.p95:.2f} | {t.max:.2f} | {t.rounds} "
            f"| {t.mean_batch:.1f} | {100 * t.busy:.0f} | {mem} |"
        )
    print()
    if best is None:
        print(f"no load level kept p95 final latency within {args.target} s")
    else:
        print(f"largest N with p95 final latency <= {args.target} s: {best}")


if __name__ == "__main__":
    main()
