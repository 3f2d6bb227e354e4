"""Many nodes behind HAProxy with the shipped ``deploy/haproxy.cfg`` (ports substituted): two real
daemons and a real HAProxy on loopback. Sources spread over the nodes and each viewer sees only
its own source; a drained node finishes its streams while new sources go to the other; a killed
node's clients reconnect through the proxy and carry on under the same source ids."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .conftest import load_benchmark

harness = load_benchmark("harness")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "haproxy.cfg"

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy is not installed (apt install haproxy)"
)

# Four ids the consistent hash spreads over both of the shipped nodes (asserted below).
SOURCES = ["room-a", "room-b", "room-c", "room-d"]
PACE_S = 0.05  # 100 ms frames every 50 ms: twice real time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """HAProxy on the shipped config, its ports substituted."""

    def __init__(self, tmp: Path, node_ports: list[int]) -> None:
        text = CONFIG.read_text()
        assert "127.0.0.1:8765" in text and "127.0.0.1:8766" in text and "bind 127.0.0.1:8080" in text
        self.port = free_port()
        text = text.replace("127.0.0.1:8765", f"127.0.0.1:{node_ports[0]}")
        text = text.replace("127.0.0.1:8766", f"127.0.0.1:{node_ports[1]}")
        text = text.replace("bind 127.0.0.1:8080", f"bind 127.0.0.1:{self.port}")
        path = tmp / "haproxy.cfg"
        path.write_text(text)
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        self.url = f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _get(port: int, path: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def node_sources(port: int) -> set[str]:
    answer = _get(port, "/v1/sources")
    return {s["id"] for s in answer["sources"]} if answer else set()


def start_node(port: int, state: Path) -> harness.DaemonProcess:
    """A node with its own transcript store, as the systemd drop-in gives each (the suite turns
    stores off by default: ``--retention-days`` turns this one on)."""
    return harness.DaemonProcess(["--backend", "cpu", "--port", str(port), "--drain-s", "60", "--state-dir",
                                  str(state / str(port)), "--retention-days", "1"])  # fmt: skip


def transcript(port: int, source: str) -> str:
    """``/v1/sources/ID/transcript`` as text, through the proxy ("" where it is not found)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/sources/{source}/transcript", timeout=5) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read().decode(errors='replace')}"
    except OSError as e:
        return f"{type(e).__name__}: {e}"


async def wait_for(check, timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


@dataclass
class Client:
    """A protocol v1 client through the proxy that carries on when its node goes: it reconnects,
    asks to resume, and when the node it reaches does not know the session (``unknown_session``)
    starts a new one under the same source id, from the frame where it was."""

    url: str
    source: str
    finals: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ended: bool = False

    async def run(self, pcm: bytes, pace_s: float = PACE_S) -> None:
        frames = [pcm[i : i + 3200] for i in range(0, len(pcm), 3200)]
        sent, seq, resume = 0, 0, None
        for _attempt in range(30):
            try:
                async with connect(f"{self.url}/v1/stream?source={self.source}", open_timeout=10) as ws:
                    start = {"type": "start", "protocol": 1, "audio": {"sample_rate": 16000}}
                    if resume is not None:
                        start["resume"] = {"session": resume, "seq": seq}
                    await ws.send(json.dumps(start))
                    first = json.loads(await ws.recv())
                    if first["type"] == "error":
                        self.errors.append(first["code"])
                        if first["code"] == "unknown_session":  # another node: a new session, same source
                            resume, seq = None, 0
                        await asyncio.sleep(0.3)
                        continue
                    if resume is None:
                        self.sessions.append(first["session"])
                    resume = first["session"]

                    async def receive() -> None:
                        nonlocal seq
                        async for text in ws:
                            msg = json.loads(text)
                            seq = max(seq, msg.get("seq", 0))
                            if msg["type"] == "final":
                                self.finals.append(msg["text"])
                            elif msg["type"] == "end":
                                self.ended = True

                    receiving = asyncio.create_task(receive())
                    while sent < len(frames):
                        await ws.send(frames[sent])
                        sent += 1
                        await asyncio.sleep(pace_s)
                    await ws.send(json.dumps({"type": "stop"}))
                    await asyncio.wait_for(receiving, 60)
                    return
            except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError) as exc:
                self.errors.append(type(exc).__name__)
                await asyncio.sleep(0.3)
        raise AssertionError(f"{self.source}: gave up after 30 connections: {self.errors}")


async def viewer(url: str, source: str, out: list[str], stop: asyncio.Event) -> None:
    """A caption viewer of ``source`` through the proxy: the finals it sees, until ``stop``."""
    async with connect(f"{url}/v1/captions?source={source}") as ws:

        async def read() -> None:
            async for text in ws:
                msg = json.loads(text)
                if msg["type"] == "final":
                    out.append(msg["text"])

        reading = asyncio.create_task(read())
        await stop.wait()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await reading


async def test_sources_spread_stay_pinned_drain_and_survive_a_killed_node(tmp_path, jfk_audio):
    pcm = harness.pcm16(jfk_audio)
    ports = [free_port(), free_port()]
    nodes = [start_node(ports[0], tmp_path), start_node(ports[1], tmp_path)]
    proxy = Proxy(tmp_path, ports)
    try:
        await wait_for(lambda: _get(proxy.port, "/healthz") is not None, what="the proxy")
        await asyncio.sleep(2.5)  # both nodes through their first health checks (rise 2 x 1 s)

        # 1. Four sources with a viewer each, all through the proxy.
        seen: dict[str, list[str]] = {s: [] for s in SOURCES}
        stop_viewers = asyncio.Event()
        viewers = [asyncio.create_task(viewer(proxy.url, s, seen[s], stop_viewers)) for s in SOURCES]
        await asyncio.sleep(0.5)
        clients = [Client(proxy.url, s) for s in SOURCES]
        running = [asyncio.create_task(c.run(pcm)) for c in clients]
        await asyncio.sleep(2.0)
        placed = [node_sources(p) for p in ports]
        await asyncio.gather(*running)
        await asyncio.sleep(0.5)
        stop_viewers.set()
        await asyncio.gather(*viewers)
        assert placed[0] | placed[1] == set(SOURCES) and placed[0] and placed[1], placed
        for c in clients:
            assert c.ended and c.finals and seen[c.source] == c.finals, (c.source, c.finals, seen[c.source])
            assert "what you can do for your country" in " ".join(c.finals).lower()
            # The download reaches the node that stored the source (each node has its own store).
            text = await asyncio.to_thread(transcript, proxy.port, c.source)
            assert "your country" in text.lower(), (c.source, text, placed)

        # 2. Drain node 1 mid-stream: its streams finish; new sources all go to node 2.
        on_first = sorted(placed[0])
        clients = [Client(proxy.url, s) for s in on_first]
        running = [asyncio.create_task(c.run(pcm)) for c in clients]
        await wait_for(lambda: set(on_first) <= node_sources(ports[0]), what="the streams on node 1")
        nodes[0].proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(3.0)  # the proxy's health check sees the 503 (fall 1 x 1 s)
        fresh = [Client(proxy.url, f"{s}-2") for s in SOURCES]
        fresh_running = [asyncio.create_task(c.run(pcm[: 4 * 32000])) for c in fresh]
        await asyncio.sleep(1.0)
        placed = [node_sources(p) for p in ports]
        await asyncio.gather(*running, *fresh_running)
        assert nodes[0].proc.wait(30) == 0
        for c in clients:  # drained, not cut: every word, one session, no error
            assert c.ended and len(c.sessions) == 1 and not c.errors, (c.source, c.errors)
            assert "what you can do for your country" in " ".join(c.finals).lower(), c.finals
        # Every new source went to node 2 at once (none was refused by the draining node first).
        assert {c.source for c in fresh} <= placed[1] and not {c.source for c in fresh} & placed[0], placed
        assert all(c.ended and not c.errors for c in fresh), [c.errors for c in fresh]

        # 3. Node 1 back; kill node 2 mid-stream: its clients reconnect to node 1 and carry on.
        nodes[0] = start_node(ports[0], tmp_path)
        await asyncio.sleep(3.5)  # node 1 up again at the proxy (rise 2 x 1 s)
        clients = [Client(proxy.url, s) for s in SOURCES]
        running = [asyncio.create_task(c.run(pcm)) for c in clients]
        await asyncio.sleep(3.0)
        doomed = node_sources(ports[1])
        assert doomed, "no source on node 2 to lose"
        nodes[1].proc.send_signal(signal.SIGKILL)
        await asyncio.gather(*running)
        for c in clients:
            assert c.ended, (c.source, c.errors)
            text = " ".join(c.finals).lower()
            assert "your country" in text, (c.source, text)  # the end of JFK, after the kill
            if c.source in doomed:
                assert len(c.sessions) == 2 and "unknown_session" in c.errors, (c.source, c.sessions, c.errors)
            else:
                assert len(c.sessions) == 1 and not c.errors, (c.source, c.errors)
    finally:
        proxy.stop()
        for node in nodes:
            node.stop()
