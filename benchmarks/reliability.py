"""Reliability over the wire: a long soak and connection churn against a real `streamd serve`.

    python benchmarks/reliability.py                     # both: a 10-minute soak of 4 streams, then 500 churn cycles
    python benchmarks/reliability.py soak --minutes 3    # one of them
    python benchmarks/reliability.py churn --cycles 60 --concurrency 8

Each check starts its own daemon (``sys.executable -m streamd serve --port 0 --log-level warning``,
CPU backend unless ``--backend``), drives it over real websockets and reads the daemon process
from /proc. It prints a markdown table of the figures with pass/fail against the bars and exits
non-zero when one fails.

Soak: ``--streams`` clients (default 4) stream dev speech at real-time pace, in 100 ms frames, for
``--minutes`` (default 10). Each stream plays its own loop of dev recordings (a different rotation
of the corpus per stream) separated by ``--gap-s`` of quiet room noise and padded to exactly
``--loop-s`` (default 60 s), so every minute of a stream carries the same speech and minutes can be
compared like with like.

- memory growth: the daemon's VmRSS is sampled every ``--sample-s`` (default 2); the baseline is
  the median of the first minute after the warm-up (``--warmup-minutes``, default 2). Growth is the
  median of the last minute over the baseline, minus 1: the trend a leak would show. The peak
  after the warm-up is reported too, for information: it catches a window's transient
  activations (tens of MB while two workers encode long windows) as much as any growth.
- lost finals: every recording played in full (each loop of each stream) is one utterance. Each
  word of each final is given to the utterance its times fall in (the nearest one). An utterance is
  lost when fewer than half of its reference words arrived in finals (jiwer hits, after Whisper's
  English normaliser), and so is a stream that gets no ``end`` after its ``stop``. The table also
  gives the WER over all utterances (what a lost word costs, next to what tiny.en costs anyway).
- error messages: every ``error`` message any stream receives.
- latency drift: a final's latency is when it arrives minus when the frame holding its ``end`` was
  sent; drift = p90 of the last minute / p90 of the first minute after the warm-up - 1 (by arrival
  time; the bar is |drift| <= 20%).
- load: per minute, the daemon's CPU and the CPU the rest of the machine used (other processes
  share the cores), to tell a drift of the daemon from a disturbed machine.

Churn: ``--cycles`` (default 500) connect / stream / disconnect cycles, ``--concurrency`` (default
8) at a time. Every third is cut abruptly mid-frame: after a random number of whole audio frames,
a random prefix of one more (masked, binary) frame is written and the TCP connection aborted, so the
daemon sees a frame header or payload cut short and no close frame; a captions viewer of that source
waits for the session's ``end`` (the daemon finalises what was sent), and only then is the cycle
over, so that ``--concurrency`` bounds the daemon's sessions too. The others are clean: start,
a short recording as fast as the socket takes it, stop, wait for ``end``. Before (after one warm-up
cycle of each kind) and after (once the daemon has settled: no live streams), the daemon's open
file descriptors (/proc/PID/fd) and asyncio tasks (/healthz ``asyncio_tasks``) are counted; the
leak is after - before. Last, one more stream (JFK, 11 s) must get its finals right (WER <= 0.1).
Where the daemon keeps a dropped client's session for resuming (``--resume-s``), the churn
daemon runs with ``--resume-s 0`` (``--churn-resume-s``), or the settling waits that long.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import jiwer
import numpy as np
from harness import (
    FRAME,
    FRAME_S,
    SR,
    DaemonProcess,
    Snapshot,
    StreamResult,
    abrupt_cycle,
    cpu_seconds,
    cut_mid_frame,
    fd_count,
    machine_busy_seconds,
    normalise,
    pcm16,
    recording_path,
    reference,
    rss_kib,
    settle,
    stream_audio,
    stream_frames,
    supports,
    thread_count,
    wer,
)

from streamd.audio import load_audio

QUIET = 3e-4  # the room between utterances: low noise, which the VAD takes for silence

# Soak speech: the dev recordings of one speaker turn each (not the 160 s reading, not the card
# names of a few syllables), about 88 s in all; each stream takes a different rotation. Left out:
# dev_vctk_p287_004_noisy, which tiny.en cannot hear even offline (WER 93%), so its words would
# count as lost whatever the daemon did. The others' offline WER is 0-25%.
SOAK_FILES = (
    "dev_jfk_inaugural_1961",
    "dev_librispeech_1089-134686-0001",
    "dev_librivox_sense_sensibility_0870",
    "dev_vctk_p287_003_clean",
    "dev_librispeech_1221-135766-0002",
    "dev_librivox_sense_sensibility_0890",
    "dev_vctk_p287_005_noisy",
    "dev_librivox_sense_sensibility_0920",
    "dev_vctk_p287_002_clean",
    "dev_librispeech_1221-135766-0001",
    "dev_librivox_sense_sensibility_0930",
    "dev_vctk_p287_006_noisy",
    "dev_librivox_sense_sensibility_0880",
    "dev_vctk_p287_001_clean",
)
CHURN_FILES = (  # 2-3.3 s each: a short bit of speech per clean cycle
    "dev_vctk_p287_001_clean",
    "dev_librivox_sense_sensibility_0880",
    "dev_librispeech_1221-135766-0002",
    "dev_vctk_p287_002_clean",
)
CHECK_FILE = "dev_jfk_inaugural_1961"


def daemon_options(args: argparse.Namespace, resume_s: float | None = None, max_streams: int = 16) -> list[str]:
    options = ["--backend", args.backend, "--workers", str(args.workers), "--threads", str(args.threads),
               "--update-s", str(args.update_s), "--max-streams", str(max_streams),
               "--max-connections", str(max(64, 2 * max_streams))]  # fmt: skip
    if resume_s is not None and supports("--resume-s"):
        options += ["--resume-s", f"{resume_s:g}"]
    return options + list(args.serve_arg)


# --- churn ---------------------------------------------------------------------------------------


@dataclass
class ChurnResult:
    cycles: int
    abrupt: int
    concurrency: int
    seconds: float
    before: Snapshot
    after: Snapshot
    settle_s: float
    clean_ended: int  # clean cycles that got their end
    clean_with_finals: int
    end_waits: list[float]  # seconds from stop (clean) or the cut (abrupt) to the session's end
    failures: list[str]  # cycles that could not run (connect, ready, end)
    error_messages: list[dict]
    check_wer: float
    check_text: str
    alive: bool
    problems: list[str]

    @property
    def clean(self) -> int:
        return self.cycles - self.abrupt

    @property
    def refused(self) -> int:
        """Cycles a full daemon turned away: their error message, or a cut cycle's missing ready."""
        return sum("too_many_streams" in f for f in self.failures) + sum(
            m.get("code") == "too_many_streams" for m in self.error_messages
        )

    @property
    def leaked_fds(self) -> int:
        return self.after.fds - self.before.fds

    @property
    def leaked_tasks(self) -> int:
        return self.after.tasks - self.before.tasks


async def run_churn(
    d: DaemonProcess, cycles: int = 500, concurrency: int = 8, abrupt_every: int = 3, seed: int = 0,
    settle_timeout_s: float = 30.0, log: Callable[[str], None] = print, resume_s: float = 0.0,
    drop_and_go: bool = False,
) -> ChurnResult:  # fmt: skip
    """``resume_s``: how long the daemon keeps a dropped session (a cut cycle's end comes that much
    later). ``drop_and_go``: a cut client just leaves, as one on flaky Wi-Fi does (no viewer waits
    for its session's end), so the daemon's detached sessions pile up while new clients come."""
    end_timeout_s = 60.0 + resume_s
    clips = [load_audio(recording_path(name)) for name in CHURN_FILES]
    check_wav = recording_path(CHECK_FILE)
    # Warm up: one cycle of each kind, so what the daemon creates lazily (engine threads, buffers)
    # is there before the baseline.
    await stream_audio(d.url, clips[0], "churn-warm-0", pace_s=None)
    await abrupt_cycle(d.url, "churn-warm-1", clips[1], np.random.default_rng(seed), end_timeout_s)
    before, _ = await settle(d, None, settle_timeout_s)
    log(f"churn: baseline {before}")

    gate = asyncio.Semaphore(concurrency)
    done = 0
    started = time.monotonic()

    async def cycle(i: int) -> tuple[bool, StreamResult | tuple[str | None, float | None]]:
        nonlocal done
        rng = np.random.default_rng([seed, i])
        audio = clips[i % len(clips)]
        async with gate:
            abrupt = i % abrupt_every == 0
            if abrupt and drop_and_go:
                outcome = (await cut_mid_frame(d.url, f"churn-{i}", audio, rng), None)
            elif abrupt:
                outcome = await abrupt_cycle(d.url, f"churn-{i}", audio, rng, end_timeout_s)
            else:
                outcome = await stream_audio(d.url, audio, f"churn-{i}", pace_s=None, end_timeout_s=60)
                if outcome.failure or not outcome.ended:  # what the daemon says of it, while it is still there
                    with contextlib.suppress(OSError):
                        live = [s for s in (await asyncio.to_thread(d.health))["streams"] if s["id"] == f"churn-{i}"]
                        outcome.failure = f"{outcome.failure}; /healthz: {live or 'no such stream'}"
            done += 1
            if done % 100 == 0:
                log(f"churn: {done}/{cycles} cycles, {time.monotonic() - started:.0f} s")
            return abrupt, outcome

    outcomes = await asyncio.gather(*(cycle(i) for i in range(cycles)))
    seconds = time.monotonic() - started
    failures, errors, ended, with_finals, waits = [], [], 0, 0, []
    for i, (abrupt, outcome) in enumerate(outcomes):
        if abrupt:
            assert isinstance(outcome, tuple)
            problem, wait = outcome
            if problem is not None:
                failures.append(f"cycle {i} (abrupt): {problem}")
            if wait is not None:
                waits.append(wait)
            continue
        assert isinstance(outcome, StreamResult)
        if outcome.end_wait is not None:
            waits.append(outcome.end_wait)
        errors += outcome.errors
        ended += outcome.ended and outcome.close_code == 1000
        with_finals += bool(outcome.text.strip())
        if outcome.failure or not outcome.ended:
            got = ", ".join(m["type"] for m in outcome.messages[-12:])
            failures.append(
                f"cycle {i}: {outcome.failure or 'no end'} (close {outcome.close_code}; last messages: {got})"
            )
    after, settle_s = await settle(d, before, settle_timeout_s)
    log(f"churn: after {after} ({settle_s:.1f} s to settle)")
    check = await stream_audio(d.url, load_audio(check_wav), "churn-check", pace_s=None)
    errors += check.errors
    return ChurnResult(
        cycles, sum(a for a, _ in outcomes), concurrency, seconds, before, after, settle_s, ended, with_finals, waits,
        failures, errors, wer(reference(check_wav), check.text), check.text, d.alive,
        d.problems(),
    )  # fmt: skip


# --- soak ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    name: str
    start: float  # seconds into the loop
    end: float
    reference: str  # normalised


@dataclass
class Loop:
    audio: np.ndarray  # exactly loop_s of audio
    utterances: list[Utterance]

    @property
    def speech_s(self) -> float:
        return sum(u.end - u.start for u in self.utterances)


@cache
def _recording(name: str) -> np.ndarray:
    return load_audio(recording_path(name))


def build_loop(names: list[str], loop_s: float, gap_s: float, seed: int = 0) -> Loop:
    """Recordings in this order, each followed by ``gap_s`` of quiet, as many as fit in
    ``loop_s`` (at least ``gap_s`` of quiet at its end), padded with quiet to exactly ``loop_s``."""
    rng = np.random.default_rng(seed)
    total = round(loop_s * SR)
    gap = round(gap_s * SR)
    pieces, utterances, at = [], [], 0
    for name in names:
        audio = _recording(name)
        if at + len(audio) + gap > total:
            continue
        reference_text = normalise(reference(recording_path(name)))
        utterances.append(Utterance(name, at / SR, (at + len(audio)) / SR, reference_text))
        pieces += [audio, rng.normal(0, QUIET, gap).astype(np.float32)]
        at += len(audio) + gap
    pieces.append(rng.normal(0, QUIET, total - at).astype(np.float32))
    return Loop(np.concatenate(pieces), utterances)


@dataclass
class Scored:
    utterances: int = 0
    lost: list[str] = field(default_factory=list)
    errors: int = 0  # word errors (S + D + I)
    words: int = 0  # reference words


def score_stream(result: StreamResult, loop: Loop, loop_s: float, sent_s: float, scored: Scored) -> None:
    """Give each final word to the utterance (of any loop) nearest its middle; score those sent in full."""
    spans = [(k * loop_s + u.start, k * loop_s + u.end, u) for k in range(int(np.ceil(sent_s / loop_s)) + 1)
             for u in loop.utterances]  # fmt: skip
    starts = [s for s, _, _ in spans]
    heard: list[list[str]] = [[] for _ in spans]
    for _, m in result.finals:
        words = m.get("words") or [{"word": " " + m["text"], "start": m["start"], "end": m["end"]}]
        for w in words:
            mid = (w["start"] + w["end"]) / 2
            j = bisect.bisect_right(starts, mid)
            near = [k for k in (j - 1, j) if 0 <= k < len(spans)]
            best = min(near, key=lambda k: max(spans[k][0] - mid, mid - spans[k][1], 0.0))
            heard[best].append(w["word"])
    for (start, end, u), words in zip(spans, heard, strict=True):
        if end > sent_s:
            continue
        scored.utterances += 1
        hypothesis = normalise("".join(words))
        n = len(u.reference.split())
        if hypothesis.strip():
            out = jiwer.process_words(u.reference, hypothesis)
            hits, errs = out.hits, out.substitutions + out.deletions + out.insertions
        else:
            hits, errs = 0, n
        scored.words += n
        scored.errors += errs
        if hits < 0.5 * n:
            scored.lost.append(f"{result.source} {u.name} at {start:.1f} s: heard {hypothesis!r}")


@dataclass
class Sample:
    t: float  # seconds since the soak started
    rss_kib: int
    fds: int
    threads: int
    tasks: int | None
    lag_s: float | None
    daemon_cpu: float
    machine_busy: float
    own_cpu: float


@dataclass
class SoakResult:
    streams: int
    minutes: float
    warmup_minutes: float
    loop_s: float
    speech_per_loop: list[float]
    samples: list[Sample]
    baseline_kib: float
    last_minute_kib: float
    peak_kib: int
    utterances: int
    lost: list[str]
    wer: float
    ended: int
    error_messages: list[dict]
    failures: list[str]
    minute_rows: list[dict]
    p90_first: float
    p90_last: float
    problems: list[str]
    alive: bool

    @property
    def growth(self) -> float:
        return self.last_minute_kib / self.baseline_kib - 1

    @property
    def peak_growth(self) -> float:
        return self.peak_kib / self.baseline_kib - 1

    @property
    def drift(self) -> float:
        return self.p90_last / self.p90_first - 1


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run_soak(
    d: DaemonProcess, streams: int = 4, minutes: float = 10.0, warmup_minutes: float = 2.0, loop_s: float = 60.0,
    gap_s: float = 1.0, sample_s: float = 2.0, log: Callable[[str], None] = print,
) -> SoakResult:  # fmt: skip
    duration = minutes * 60
    if warmup_minutes + 1 > minutes:
        raise ValueError("the soak needs at least one minute after the warm-up")
    loops = []
    for i in range(streams):
        shift = i * len(SOAK_FILES) // streams
        loops.append(build_loop(list(SOAK_FILES[shift:] + SOAK_FILES[:shift]), loop_s, gap_s, seed=i))
    count = round(duration / FRAME_S)
    samples: list[Sample] = []
    stop_sampling = asyncio.Event()
    t0 = time.perf_counter() + 1.0  # the streams start together, staggered by a fraction of a frame

    async def sample() -> None:
        while not stop_sampling.is_set():
            t = time.perf_counter() - t0
            try:
                health = await asyncio.to_thread(d.health)
            except OSError:
                health = {}
            samples.append(Sample(t, rss_kib(d.pid), fd_count(d.pid), thread_count(d.pid), health.get("asyncio_tasks"),
                                  health.get("lag_s"), cpu_seconds(d.pid), machine_busy_seconds(),
                                  time.process_time()))  # fmt: skip
            if len(samples) % max(1, round(60 / sample_s)) == 0:
                log(f"soak: {t / 60:.1f} min, rss {samples[-1].rss_kib / 1024:.1f} MiB, lag {health.get('lag_s')} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), sample_s)

    def frames(loop: Loop):
        pcm = pcm16(loop.audio)
        step, n = 2 * FRAME, len(loop.audio) // FRAME
        return lambda i: pcm[(i % n) * step : (i % n + 1) * step]

    sampler = asyncio.create_task(sample())
    results = await asyncio.gather(*(
        stream_frames(d.url, f"soak-{i}", frames(loop), count, FRAME_S, t0=t0 + i * FRAME_S / streams)
        for i, loop in enumerate(loops)
    ))  # fmt: skip
    stop_sampling.set()
    await sampler

    scored = Scored()
    lost, failures, errors = [], [], []
    for result, loop in zip(results, loops, strict=True):
        score_stream(result, loop, loop_s, duration, scored)
        errors += result.errors
        if result.failure or not result.ended:
            failures.append(f"{result.source}: {result.failure or 'no end'} (close {result.close_code})")
    lost = scored.lost + [f"{f} (a stream without its end)" for f in failures]

    warm = warmup_minutes * 60
    latencies = [(t - t0, lat) for r in results for t, lat in r.final_latencies]
    rows = []
    for m in range(int(np.ceil(minutes))):
        lo, hi = m * 60, min((m + 1) * 60, duration)
        lats = [lat for t, lat in latencies if lo <= t < hi]
        inside = [s for s in samples if lo <= s.t <= hi]
        nan = float("nan")
        row = {"minute": m + 1, "finals": len(lats), "p50": _p(lats, 50), "p90": _p(lats, 90),
               "max": max(lats, default=nan), "rss_mib": nan, "daemon_cores": nan, "other_cores": nan,
               "lag_max": max((s.lag_s or 0.0 for s in inside), default=nan)}  # fmt: skip
        if len(inside) >= 2:
            a, b = inside[0], inside[-1]
            dt = b.t - a.t
            row["rss_mib"] = statistics.median(s.rss_kib for s in inside) / 1024
            row["daemon_cores"] = (b.daemon_cpu - a.daemon_cpu) / dt
            row["other_cores"] = ((b.machine_busy - a.machine_busy) - (b.daemon_cpu - a.daemon_cpu)
                                  - (b.own_cpu - a.own_cpu)) / dt  # fmt: skip
        rows.append(row)
    first = [lat for t, lat in latencies if warm <= t < warm + 60]
    last = [lat for t, lat in latencies if duration - 60 <= t < duration]
    after = [s for s in samples if s.t >= warm]
    baseline = statistics.median(s.rss_kib for s in after if s.t < warm + 60)
    last_minute = statistics.median(s.rss_kib for s in after if s.t >= duration - 60)
    return SoakResult(
        streams, minutes, warmup_minutes, loop_s, [loop.speech_s for loop in loops], samples, baseline, last_minute,
        max(s.rss_kib for s in after), scored.utterances, lost, scored.errors / max(scored.words, 1),
        sum(r.ended for r in results), errors, failures, rows, _p(first, 90), _p(last, 90), d.problems(), d.alive,
    )  # fmt: skip


# --- the report ----------------------------------------------------------------------------------

SOAK_GROWTH_BAR = 0.05
SOAK_DRIFT_BAR = 0.20
CHECK_WER_BAR = 0.10


def soak_rows(s: SoakResult) -> list[tuple[str, str, str, bool]]:
    mib = 1024
    return [
        ("soak: memory growth (median RSS, last minute vs first minute after warm-up)",
         f"{100 * s.growth:+.2f}% ({s.baseline_kib / mib:.1f} → {s.last_minute_kib / mib:.1f} MiB)",
         f"≤ {100 * SOAK_GROWTH_BAR:.0f}%", s.growth <= SOAK_GROWTH_BAR),
        ("soak: peak RSS after warm-up vs the baseline (information: includes transient activations)",
         f"{100 * s.peak_growth:+.2f}% ({s.peak_kib / mib:.1f} MiB)", "-", True),
        ("soak: lost finals (utterances with < half their words in finals)", f"{len(s.lost)} of {s.utterances}",
         "0", not s.lost),
        ("soak: streams that got their end after stop", f"{s.ended} of {s.streams}", "all", s.ended == s.streams),
        ("soak: error messages", str(len(s.error_messages)), "0", not s.error_messages),
        ("soak: p90 final latency, first minute after warm-up → last minute",
         f"{s.p90_first:.2f} s → {s.p90_last:.2f} s: drift {100 * s.drift:+.1f}%",
         f"within ±{100 * SOAK_DRIFT_BAR:.0f}%", abs(s.drift) <= SOAK_DRIFT_BAR),
        ("soak: WER over all utterances (tiny.en, greedy; information)", f"{100 * s.wer:.2f}%", "-", True),
        ("soak: daemon errors logged", str(len(s.problems)), "0", not s.problems and s.alive),
    ]  # fmt: skip


def churn_rows(c: ChurnResult) -> list[tuple[str, str, str, bool]]:
    return [
        ("churn: cycles (abrupt mid-frame cuts)",
         f"{c.cycles} ({c.abrupt}) in {c.seconds:.0f} s, {c.concurrency} at a time", "-", not c.failures),
        ("churn: clean cycles that got their end / any finals",
         f"{c.clean_ended} / {c.clean_with_finals} of {c.clean}", "all",
         c.clean_ended == c.clean_with_finals == c.clean),
        ("churn: a session's end after its stop or cut: p50 / p90 / max (information)",
         f"{_p(c.end_waits, 50):.2f} / {_p(c.end_waits, 90):.2f} / {max(c.end_waits, default=float('nan')):.2f} s",
         "-", True),
        ("churn: clients refused for the stream limit (1013, too_many_streams)", str(c.refused), "0",
         not c.refused),
        ("churn: error messages", str(len(c.error_messages)), "0", not c.error_messages),
        ("churn: leaked file descriptors", f"{c.leaked_fds:+d} ({c.before.fds} → {c.after.fds})", "0",
         c.leaked_fds <= 0),
        ("churn: leaked asyncio tasks", f"{c.leaked_tasks:+d} ({c.before.tasks} → {c.after.tasks})", "0",
         c.leaked_tasks <= 0),
        ("churn: threads, RSS (information)",
         f"{c.before.threads} → {c.after.threads}; {c.before.rss_kib / 1024:.1f} → {c.after.rss_kib / 1024:.1f} MiB",
         "-", True),
        ("churn: a stream afterwards (JFK) WER", f"{100 * c.check_wer:.1f}%", f"≤ {100 * CHECK_WER_BAR:.0f}%",
         c.check_wer <= CHECK_WER_BAR and c.alive),
        ("churn: daemon errors logged", str(len(c.problems)), "0", not c.problems),
    ]  # fmt: skip


def render(rows: list[tuple[str, str, str, bool]]) -> str:
    lines = ["| check | figure | bar | result |", "|---|---|---|---|"]
    lines += [f"| {name} | {figure} | {bar} | {'pass' if ok else '**FAIL**'} |" for name, figure, bar, ok in rows]
    return "\n".join(lines)


def minute_table(s: SoakResult) -> str:
    lines = ["| minute | finals | p50 s | p90 s | max s | lag max s | RSS MiB | daemon cores | other cores |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in s.minute_rows:
        mark = " (warm-up)" if r["minute"] <= s.warmup_minutes else ""
        lines.append(
            f"| {r['minute']}{mark} | {r['finals']} | {r['p50']:.2f} | {r['p90']:.2f} | {r['max']:.2f} | "
            f"{r['lag_max']:.2f} | {r['rss_mib']:.1f} | {r['daemon_cores']:.2f} | {r['other_cores']:.2f} |"
        )
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    started, wall = datetime.datetime.now().astimezone(), time.monotonic()
    which = ("soak", "churn") if args.check == "all" else (args.check,)
    rows, notes = [], []
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    print(f"reliability: {started:%Y-%m-%d %H:%M %Z}, {os.cpu_count()} cores ({cpu}), "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    soak = churn = None
    if "soak" in which:
        with DaemonProcess(daemon_options(args, max_streams=max(16, args.streams))) as d:
            print(f"soak daemon: {shlex.join(d.command)} (started in {d.startup_s:.1f} s)", flush=True)
            soak = await run_soak(d, args.streams, args.minutes, args.warmup_minutes, args.loop_s, args.gap_s,
                                  args.sample_s)  # fmt: skip
            exit_status = d.stop()
        rows += soak_rows(soak)
        if exit_status != 0:
            rows.append(("soak: daemon exit status on SIGTERM", str(exit_status), "0", False))
        notes.append(f"soak: {args.streams} streams × {args.minutes:g} min at real-time pace, warm-up "
                     f"{args.warmup_minutes:g} min; each stream loops {args.loop_s:g} s holding "
                     + ", ".join(f"{x:.1f}" for x in soak.speech_per_loop) + " s of speech; "
                     f"{soak.utterances} utterances played; RSS sampled every {args.sample_s:g} s")  # fmt: skip
    if "churn" in which:
        resume = args.churn_resume_s if supports("--resume-s") else None
        streams = max(16, 2 * args.concurrency)
        with DaemonProcess(daemon_options(args, resume, max_streams=streams)) as d:
            print(f"churn daemon: {shlex.join(d.command)} (started in {d.startup_s:.1f} s)", flush=True)
            waits = resume or 0.0
            churn = await run_churn(d, args.cycles, args.concurrency, seed=args.seed,
                                    settle_timeout_s=args.settle_s + waits, resume_s=waits,
                                    drop_and_go=args.drop_and_go)  # fmt: skip
            exit_status = d.stop()
        rows += churn_rows(churn)
        if exit_status != 0:
            rows.append(("churn: daemon exit status on SIGTERM", str(exit_status), "0", False))
        resumed = f"--resume-s {resume:g}" if resume is not None else "the daemon has no --resume-s"
        dropping = "; cut clients drop and go" if args.drop_and_go else ""
        notes.append(f"churn: baseline {churn.before}, after {churn.after} ({churn.settle_s:.1f} s to settle); "
                     f"session resume: {resumed}{dropping}")  # fmt: skip
    print()
    print(f"settings: backend {args.backend}, --workers {args.workers}, --threads {args.threads}, "
          f"--update-s {args.update_s:g}" + (f", {' '.join(args.serve_arg)}" if args.serve_arg else ""))  # fmt: skip
    for note in notes:
        print(note)
    print()
    print(render(rows))
    if soak is not None:
        print()
        print(minute_table(soak))
    for name, result in (("soak", soak), ("churn", churn)):
        if result is None:
            continue
        for what, items in (("lost", getattr(result, "lost", [])), ("failures", result.failures),
                            ("error messages", result.error_messages), ("daemon log", result.problems)):  # fmt: skip
            if items:
                print(f"\n{name} {what} ({len(items)}):")
                for item in items[:20]:
                    print(f"  {item}")
    print(f"\nwall time {time.monotonic() - wall:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        figures = {"started": started.isoformat(), "argv": sys.argv, "rows": rows,
                   "soak": None if soak is None else {k: v for k, v in soak.__dict__.items() if k != "samples"}
                   | {"samples": [s.__dict__ for s in soak.samples]},
                   "churn": None if churn is None else churn.__dict__}  # fmt: skip
        Path(args.json).write_text(json.dumps(figures, indent=1, default=lambda o: getattr(o, "__dict__", str(o))))
    return 0 if all(ok for *_, ok in rows) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("check", nargs="?", choices=("all", "soak", "churn"), default="all", help="default: both")
    p.add_argument("--streams", type=int, default=4, help="soak: concurrent real-time streams (default 4)")
    p.add_argument("--minutes", type=float, default=10.0, help="soak: length (default 10)")
    p.add_argument("--warmup-minutes", type=float, default=2.0, help="soak: left out of the baselines (default 2)")
    p.add_argument("--loop-s", type=float, default=60.0, help="soak: each stream's loop of speech (default 60)")
    p.add_argument("--gap-s", type=float, default=1.0, help="soak: quiet after each utterance (default 1)")
    p.add_argument("--sample-s", type=float, default=2.0, help="soak: RSS sampling interval (default 2)")
    p.add_argument("--cycles", type=int, default=500, help="churn: connect/stream/disconnect cycles (default 500)")
    p.add_argument("--concurrency", type=int, default=8, help="churn: cycles at a time (default 8)")
    p.add_argument("--settle-s", type=float, default=30.0, help="churn: at most this long for the counts to settle")
    p.add_argument(
        "--churn-resume-s",
        type=float,
        default=0.0,
        help="churn: the daemon's --resume-s, where it has one (default 0: sessions end on a drop)",
    )
    p.add_argument(
        "--drop-and-go",
        action="store_true",
        help="churn: a cut client just leaves (nobody waits for its session's end); with --churn-resume-s 30 "
        "this is the daemon's default settings under flaky clients",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="cpu", help="the daemon's --backend (default cpu)")
    p.add_argument("--workers", type=int, default=2, help="the daemon's --workers (default 2: one per core here)")
    p.add_argument("--threads", type=int, default=1, help="the daemon's --threads (default 1)")
    p.add_argument("--update-s", type=float, default=1.0, help="the daemon's --update-s (default 1.0)")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for `streamd serve` (repeat: --serve-arg=--max-queue --serve-arg=64)",
    )
    p.add_argument("--json", metavar="PATH", help="also write every figure (and the RSS samples) there")
    args = p.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
