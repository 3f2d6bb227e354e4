"""What the benchmarks share: the corpus, its scoring, and a real daemon with its clients.

- The corpus: ``../shared/corpus/{dev,nonspeech}`` beside the repository when it is there, else
  the repository's own test audio (``tests/data``), so that a clone can run every benchmark.
- Scoring as the corpus READMEs say: Whisper's English normaliser on both sides, then jiwer.
- :class:`DaemonProcess`: ``streamd serve`` as a subprocess on a free loopback port, with its
  ``/proc`` figures (RSS, descriptors, threads, CPU); and a protocol v1 client that streams a
  recording at real-time pace and collects what comes back (:func:`stream_audio`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import jiwer
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from whisper_normalizer.english import EnglishTextNormalizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpus"
CORPUS = SHARED / "dev"
NONSPEECH = SHARED / "nonspeech"
TEST_DATA = ROOT / "tests" / "data"
SR = 16000
FRAME_S = 0.1
FRAME = round(FRAME_S * SR)
TICK = os.sysconf("SC_CLK_TCK")

normalise = EnglishTextNormalizer()


def recording_path(name: str) -> Path:
    """A dev recording by name: the corpus beside the repository, else the repository's test copy."""
    wav = CORPUS / f"{name}.wav"
    return wav if wav.exists() else TEST_DATA / "speech" / f"{name}.flac"


def reference(path: str | Path) -> str:
    """A recording's reference transcript (the ``.txt`` beside it)."""
    return Path(path).with_suffix(".txt").read_text(encoding="utf-8")


LONG_FORM = CORPUS / "dev_librivox_shakespeare_sonnets_1-3_longform.wav"
JOINED_GAP_S = 1.0


def shorter_files() -> list[Path]:
    """The dev corpus's recordings other than the long-form (1.1-16.7 s), in name order."""
    return sorted(p for p in CORPUS.glob("*.wav") if p != LONG_FORM)


def joined_shorter_files() -> tuple[np.ndarray, str, int]:
    """:func:`shorter_files` one after another with 1 s of a quiet room (noise at 3e-4) between
    them: issue 18's second live bar. ``(audio, the references joined, how many files)``."""
    from streamd.audio import load_audio

    paths = shorter_files()
    if not paths:
        raise SystemExit(f"no dev recordings in {CORPUS} (the corpus lies beside the repository)")
    gap = np.random.default_rng(0).normal(0, 3e-4, round(JOINED_GAP_S * SR)).astype(np.float32)
    parts: list[np.ndarray] = []
    for path in paths:
        parts += [load_audio(path), gap]
    return np.concatenate(parts), " ".join(reference(p) for p in paths), len(paths)


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """Word error rate over a set, as the corpus READMEs score it (a fraction, not percent)."""
    return jiwer.wer([normalise(r) for r in references], [normalise(h) for h in hypotheses])


# --- the daemon process ------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


@cache
def serve_options() -> str:
    """``streamd serve --help``: which options this daemon has (flags added later are passed only
    when there)."""
    return subprocess.run(
        [sys.executable, "-m", "streamd", "serve", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    ).stdout


def supports(flag: str) -> bool:
    return re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", serve_options()) is not None


class DaemonProcess:
    """``python -m streamd serve --port 0`` as a subprocess; its stderr is kept (a full pipe would
    block its logging)."""

    def __init__(self, options: list[str], startup_timeout_s: float = 180.0) -> None:
        self.command = [sys.executable, "-m", "streamd", "serve", "--port", "0", "--log-level", "warning", *options]
        self.proc = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            cwd=ROOT,
        )  # fmt: skip
        self.log: list[str] = []
        self.http = ""
        self._serving = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        started = time.monotonic()
        if not self._serving.wait(startup_timeout_s) or not self.http:
            self.stop()
            raise RuntimeError(f"the daemon did not start: {shlex.join(self.command)}\n" + "\n".join(self.log[-20:]))
        self.startup_s = time.monotonic() - started

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if not self.http and (m := re.search(r"serving .* on (http://[\w.]+:\d+)", line)):
                self.http = m[1]
                self._serving.set()
                continue
            self.log.append(line.rstrip("\n"))
        self._serving.set()  # it exited

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return self.http.replace("http://", "ws://", 1) + "/v1/stream"

    def health(self) -> dict:
        with urllib.request.urlopen(self.http + "/healthz", timeout=10) as response:
            return json.load(response)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def problems(self) -> list[str]:
        """Log lines at ERROR or above, and tracebacks (the daemon logs at warning)."""
        return [line for line in self.log if re.search(r"\b(ERROR|CRITICAL)\b|^Traceback", line)]

    def stop(self) -> int | None:
        """SIGTERM (the daemon finalises and exits), then kill if it hangs; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class Snapshot:
    fds: int
    tasks: int
    threads: int
    rss_kib: int
    streams: int


async def snapshot(d: DaemonProcess) -> Snapshot:
    """Descriptors are counted before the /healthz request (whose own connection is one)."""
    fds, threads, rss = fd_count(d.pid), thread_count(d.pid), rss_kib(d.pid)
    health = await asyncio.to_thread(d.health)
    return Snapshot(fds, health["asyncio_tasks"], threads, rss, len(health["streams"]))


async def settle(d: DaemonProcess, baseline: Snapshot | None, timeout_s: float) -> tuple[Snapshot, float]:
    """Wait until no stream is live and the counts are back at ``baseline`` (or, without one, the
    same twice running), at most ``timeout_s``; returns the last snapshot and the seconds waited."""
    started = time.monotonic()
    await asyncio.sleep(1.0)
    last = None
    while True:
        snap = await snapshot(d)
        if snap.streams == 0:
            if baseline is None and last is not None and (snap.fds, snap.tasks) == (last.fds, last.tasks):
                break
            if baseline is not None and snap.fds <= baseline.fds and snap.tasks <= baseline.tasks:
                break
        if time.monotonic() - started > timeout_s:
            break
        last = snap
        await asyncio.sleep(1.0)
    return snap, time.monotonic() - started


# --- clients ------------------------------------------------------------------------------------


def start_message(source: str) -> str:
    return json.dumps({"type": "start", "protocol": 1, "source": source,
                       "audio": {"encoding": "pcm_s16le", "sample_rate": SR, "channels": 1}})  # fmt: skip


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


@dataclass
class StreamResult:
    source: str
    messages: list[dict] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # perf_counter when each message arrived
    sent_at: list[float] = field(default_factory=list)  # perf_counter when frame i was sent
    failure: str | None = None  # the connection could not be made or broke
    close_code: int | None = None
    stopped_at: float | None = None  # perf_counter when stop was sent

    @property
    def end_wait(self) -> float | None:
        """Seconds from stop to end."""
        return self.arrivals[-1] - self.stopped_at if self.ended and self.stopped_at is not None else None

    @property
    def ended(self) -> bool:
        return bool(self.messages) and self.messages[-1]["type"] == "end"

    @property
    def errors(self) -> list[dict]:
        return [m for m in self.messages if m["type"] == "error"]

    @property
    def finals(self) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in zip(self.arrivals, self.messages, strict=True) if m["type"] == "final"]

    @property
    def text(self) -> str:
        return " ".join(m["text"] for _, m in self.finals)

    def latency(self, arrived: float, end: float) -> float:
        """``arrived`` minus when the frame holding stream time ``end`` was sent."""
        i = min(max(int(np.ceil(end / FRAME_S - 1e-6)) - 1, 0), len(self.sent_at) - 1)
        return arrived - self.sent_at[i]

    @property
    def final_latencies(self) -> list[tuple[float, float]]:
        """(arrival, latency) of each final."""
        return [(t, self.latency(t, m["end"])) for t, m in self.finals]


async def stream_frames(
    url: str,
    source: str,
    frame: Callable[[int], bytes],
    count: int,
    pace_s: float | None = FRAME_S,
    end_timeout_s: float = 120.0,
    t0: float | None = None,
) -> StreamResult:
    """One ``/v1/stream`` client: start, ``count`` frames (frame ``i`` sent at ``t0 + i * pace_s``;
    ``pace_s`` None: as fast as the socket takes them), stop, and every message until the close."""
    result = StreamResult(source)
    try:
        async with connect(url, max_size=None, open_timeout=30) as ws:
            await ws.send(start_message(source))

            async def receive() -> None:
                with contextlib.suppress(ConnectionClosed):
                    async for text in ws:
                        result.arrivals.append(time.perf_counter())
                        result.messages.append(json.loads(text))

            receiving = asyncio.create_task(receive())
            t0 = time.perf_counter() if t0 is None else t0
            for i in range(count):
                if pace_s is not None:
                    delay = t0 + i * pace_s - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(0)
                await ws.send(frame(i))
                result.sent_at.append(time.perf_counter())
            await ws.send(json.dumps({"type": "stop"}))
            result.stopped_at = time.perf_counter()
            try:
                await asyncio.wait_for(receiving, end_timeout_s)
            except TimeoutError:
                result.failure = f"no end within {end_timeout_s:g} s of stop"
            result.close_code = ws.close_code
    except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
        result.failure = f"{type(exc).__name__}: {exc}"
    return result


async def stream_audio(url: str, audio: np.ndarray, source: str, pace_s: float | None = FRAME_S, **kw) -> StreamResult:
    pcm = pcm16(audio)
    step = 2 * FRAME
    return await stream_frames(
        url, source, lambda i: pcm[i * step : (i + 1) * step], -(-len(pcm) // step), pace_s, **kw
    )


def masked_frame(payload: bytes, rng: np.random.Generator) -> bytes:
    """A client's binary websocket frame (FIN, opcode 2, masked) as it goes on the wire."""
    n = len(payload)
    if n < 126:
        header = bytes([0x82, 0x80 | n])
    elif n < 1 << 16:
        header = bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x82, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = rng.bytes(4)
    masked = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)
    return header + mask + masked.tobytes()


async def cut_mid_frame(url: str, source: str, audio: np.ndarray, rng: np.random.Generator) -> str | None:
    """Start, a random number of whole frames, then part of one more frame and the TCP connection
    torn down (no close frame). Returns what went wrong before the cut, if anything."""
    try:
        ws = await connect(url, max_size=None, open_timeout=30)
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        return f"connect: {type(exc).__name__}: {exc}"
    try:
        await ws.send(start_message(source))
        ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if ready["type"] != "ready":
            return f"no ready: {ready}"
        frames = max(1, len(audio) // FRAME)
        whole = int(rng.integers(0, frames))
        for i in range(whole):
            await ws.send(pcm16(audio[i * FRAME : (i + 1) * FRAME]))
            await asyncio.sleep(0)
        wire = masked_frame(pcm16(audio[whole * FRAME : (whole + 1) * FRAME]) or bytes(2 * FRAME), rng)
        ws.transport.write(wire[: int(rng.integers(1, len(wire)))])  # a header or payload cut short
        ws.transport.abort()
        return None
    except (OSError, ConnectionClosed, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        ws.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.wait_closed(), 5)


async def _until_end(ws) -> None:
    while json.loads(await ws.recv())["type"] != "end":
        pass


async def abrupt_cycle(
    url: str, source: str, audio: np.ndarray, rng: np.random.Generator, end_timeout_s: float = 60.0
) -> tuple[str | None, float | None]:
    """:func:`cut_mid_frame`, watched by a captions viewer of the source: the cycle is over when the
    daemon has finalised the session (its ``end`` reaches the viewer), so that ``concurrency``
    counts the daemon's sessions, not only the clients' connections. What went wrong, if anything,
    and the seconds from the cut to the end."""
    viewer_url = url.replace("/v1/stream", f"/v1/captions?source={source}")
    try:
        async with connect(viewer_url, max_size=None, open_timeout=30) as viewer:
            problem = await cut_mid_frame(url, source, audio, rng)
            if problem is not None:
                return problem, None
            cut = time.monotonic()
            try:
                await asyncio.wait_for(_until_end(viewer), end_timeout_s)
            except TimeoutError:
                return f"its viewer got no end within {end_timeout_s:g} s of the cut", None
            return None, time.monotonic() - cut
    except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
        return f"its viewer: {type(exc).__name__}: {exc}", None


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = normalise(reference), normalise(hypothesis)
    return jiwer.wer(ref, hyp) if hyp.strip() else 1.0
