"""Nobody speaks, nothing is written: music and noise through a real daemon give no final."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamd.server import Daemon, ServerConfig

from .test_server import finals_text, receive_all, send_audio, start, url


@pytest.fixture
async def daemon(engine):
    d = Daemon(engine, ServerConfig(port=0, start_timeout_s=2.0, resume_s=0.0))
    await d.start()
    yield d
    await d.shutdown()


async def stream(d: Daemon, audio: np.ndarray, source: str) -> list[dict]:
    async with connect(url(d, "/v1/stream")) as ws:
        await ws.send(start(source))
        receiving = asyncio.create_task(receive_all(ws))
        await send_audio(ws, audio)
        await ws.send(json.dumps({"type": "stop"}))
        return await receiving


async def metrics(d: Daemon) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics", timeout=10) as r:
            return r.read().decode()

    return await asyncio.to_thread(get)


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_music_and_noise_give_no_final_and_no_engine_work(daemon, music, pink_noise):
    jobs = daemon.scheduler.stats.jobs
    for audio, source in ((music, "music"), (pink_noise, "noise")):
        messages = await stream(daemon, audio, source)
        assert messages[-1]["type"] == "end"
        assert finals_text(messages) == "" and not any(m["type"] == "partial" for m in messages), messages
        # The vad events say what the second stage decided: no speech was ever confirmed.
        assert not [m for m in messages if m["type"] == "vad" and m["speech"]]
    assert daemon.scheduler.stats.jobs == jobs, "the engine decoded a window of music or noise"
    text = await metrics(daemon)
    assert metric(text, "streamd_vad_rejected_regions_total") >= 2
    assert metric(text, "streamd_speech_detector_audio_seconds_total") > 0
    assert 'streamd_guard_dropped_windows_total{rule="no_speech"}' in text


async def test_speech_after_music_still_gives_its_text(daemon, music, jfk_audio):
    audio = np.concatenate([music, np.zeros(8000, np.float32), jfk_audio])
    messages = await stream(daemon, audio, "room")
    # Words, not punctuation: Whisper writes "ask not, what" or "ask not! what" from run to run.
    text = " ".join(re.sub(r"[^a-z0-9' ]+", " ", finals_text(messages).lower()).split())
    assert text.startswith("and so my fellow americans") and "ask not what your country" in text, text
    first = next(m for m in messages if m["type"] == "final")
    assert first["start"] >= len(music) / 16000 - 0.5  # nothing was written over the guitar
