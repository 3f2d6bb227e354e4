"""A node told to stop behind a proxy: it drains (``/healthz`` 503, no new sources, live streams
finish), then stops; and ``/v1/stream?source=ID`` names a source before the first frame, so a
proxy can route by it. Real daemons: in this process, and ``streamd serve`` as a process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from .conftest import load_benchmark, running

harness = load_benchmark("harness")
ROOT = Path(__file__).resolve().parents[1]


def _health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def _refused(url: str, source: str) -> tuple[int | None, str]:
    """A new stream's fate: the close code and reason it got (``None``: it was taken)."""
    async with connect(url) as ws:
        await ws.send(harness.start_message(source))
        try:
            first = json.loads(await ws.recv())
            if first["type"] == "ready":
                await ws.send(json.dumps({"type": "stop"}))
                return None, ""
            await ws.recv()
        except ConnectionClosedError:
            pass
        return ws.close_code, ws.close_reason


async def test_a_draining_node_answers_503_takes_no_new_source_and_lets_its_streams_finish(engine, jfk_audio):
    async with running(engine) as d:
        url = f"ws://127.0.0.1:{d.port}/v1/stream"
        assert (await asyncio.to_thread(_health, d.port))[0] == 200
        streaming = asyncio.create_task(harness.stream_audio(url, jfk_audio, "room-1", pace_s=0.025))
        while not d.hub.sources:
            await asyncio.sleep(0.01)
        d.request_drain()
        code, health = await asyncio.to_thread(_health, d.port)
        refused = await _refused(url, "room-2")
        done = await streaming
        await d.drain(5)
        assert not d.hub.sources
    assert code == 503 and health["status"] == "draining" and [s["id"] for s in health["streams"]] == ["room-1"]
    assert refused[0] == 1013 and "draining" in refused[1]
    # The stream that was live finished as if nothing happened: every final, then its end.
    assert done.ended and not done.errors and "what you can do for your country" in done.text.lower()


async def test_the_url_names_the_source_and_must_agree_with_the_start_message(engine):
    async with running(engine) as d:
        base = f"ws://127.0.0.1:{d.port}/v1/stream"
        async with connect(base + "?source=room-7") as ws:
            await ws.send(json.dumps({"type": "start", "protocol": 1}))
            ready = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "stop"}))
        async with connect(base + "?source=room-7") as ws:
            await ws.send(harness.start_message("room-8"))
            error = json.loads(await ws.recv())
        with pytest.raises(InvalidStatus) as bad:
            async with connect(base + "?source=a%20b"):
                pass
    assert ready["type"] == "ready" and ready["source"] == "room-7"
    assert error["code"] == "bad_start" and "'room-8'" in error["message"] and "'room-7'" in error["message"]
    assert bad.value.response.status_code == 400


def _serve(*options: str) -> harness.DaemonProcess:
    return harness.DaemonProcess(["--backend", "cpu", *options])


async def test_sigterm_with_drain_s_waits_for_the_live_stream_then_exits(jfk_audio):
    with _serve("--drain-s", "60") as d:
        port = int(d.http.rsplit(":", 1)[1])
        streaming = asyncio.create_task(harness.stream_audio(d.url, jfk_audio, "room-1"))  # real time: 11 s
        while not (await asyncio.to_thread(d.health))["streams"]:
            await asyncio.sleep(0.05)
        d.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        code, health = await asyncio.to_thread(_health, port)
        assert d.alive, "the node stopped before its stream ended"
        done = await streaming
        exit_code = await asyncio.to_thread(d.proc.wait, 30)
    assert code == 503 and health["status"] == "draining"
    assert done.ended and not done.errors and done.close_code == 1000, done.failure
    assert "what you can do for your country" in done.text.lower() and exit_code == 0


def test_streamd_drain_asks_the_daemon_the_settings_name(tmp_path):
    with _serve() as d:
        port = d.http.rsplit(":", 1)[1]
        env = {**os.environ, "STREAMD_PORT": port}
        drained = subprocess.run([sys.executable, "-m", "streamd", "drain", "--timeout-s", "5"], env=env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        exit_code = d.proc.wait(30)  # no streams: it stops at once
    assert drained.returncode == 0 and "draining" in drained.stdout, drained.stderr
    assert exit_code == 0
    refused = subprocess.run([sys.executable, "-m", "streamd", "drain"], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 1 and "refused" in refused.stderr.lower()
