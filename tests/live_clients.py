"""What the live-protocol adapter tests share: audio as clients send it, and protocol v1's text
for the same file at the same pace (the bar each adapter is held to)."""

from __future__ import annotations

import asyncio
import json

import jiwer
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from whisper_normalizer.english import EnglishTextNormalizer

from .conftest import reference

normalise = EnglishTextNormalizer()
SPEED = 4.0  # times real time: the stream is paced, as a live client's is, and the test stays short


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def wer(path, text: str) -> float:
    return jiwer.wer(normalise(reference(path)), normalise(text))


def live_bar(path, v1: str) -> float:
    """What an adapter's text may score on ``path``: protocol v1's WER on the same bytes plus one
    point, or two words where that is more. The 1-point bar is for the dev long-form; on a test
    recording of 50 words one word is 2 points, and the live schedule (when each decode finishes)
    moves words between runs: "descent of mortals" was "descent of the world" in one run of two,
    with another test loading the second core."""
    return wer(path, v1) + max(0.01, 2 / len(normalise(reference(path)).split())) + 1e-9


async def v1_text(port: int, pcm: bytes, rate: int = 16000, speed: float = SPEED) -> str:
    """The joined finals protocol v1 gives for ``pcm`` (s16le at ``rate``: the bytes the adapter
    under test got) sent 100 ms at a time at ``speed``."""
    step = rate // 10 * 2
    async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        await ws.send(json.dumps({"type": "start", "protocol": 1, "audio": {"sample_rate": rate}}))
        finals: list[str] = []

        async def receive() -> None:
            try:
                async for frame in ws:
                    msg = json.loads(frame)
                    if msg["type"] == "final":
                        finals.append(msg["text"])
            except ConnectionClosed:
                pass

        receiving = asyncio.create_task(receive())
        for i in range(0, len(pcm), step):
            await ws.send(pcm[i : i + step])
            await asyncio.sleep(0.1 / speed)
        await ws.send(json.dumps({"type": "stop"}))
        await receiving
    return " ".join(finals)
