"""`streamd serve` as a process: settings, a file source, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import speech_file


def serve(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamd", "serve", *args], capture_output=True, text=True, **kw)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('port = "x"\n', "port must be int"),
        ("colour = 1\n", "unknown key 'colour'"),
        ("vad_aggressiveness = 7\n", "vad_aggressiveness must be 0..3"),
        ('speech_detector = "webrtc"\n', "speech detector must be one of silero, off"),
        ("speech_threshold = 1.2\n", "speech threshold must be between 0 and 1"),
        ("speech_threshold = 0.4\nspeech_neg_threshold = 0.6\n", "neg_threshold must be from 0 to the threshold"),
        ("port = \n", "bad.toml"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, content, message):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    result = serve("--config", str(config), timeout=30)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_command_line_wins_over_the_config_file(tmp_path):
    config = tmp_path / "ok.toml"
    config.write_text("threads = 0\n")
    assert "threads must be at least 1" in serve("--config", str(config), timeout=30).stderr
    # The flag overrides the bad file value: the daemon then fails later, on the port.
    assert "threads" not in serve("--config", str(config), "--threads", "1", "--port", "-1", timeout=60).stderr


async def test_sigterm_flushes_a_file_source_to_its_viewer_and_exits_0():
    wav = speech_file("dev_jfk_inaugural_1961")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamd", "serve", "--port", "0", "--file", str(wav), "--realtime",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, "the daemon exited before serving"
            if m := re.search(r"serving .* on http://127.0.0.1:(\d+)", line):
                port = int(m[1])
        messages = []
        async with connect(f"ws://127.0.0.1:{port}/v1/captions?source=dev_jfk_inaugural_1961") as viewer:
            while not any(m["type"] == "partial" and "fellow" in m["text"].lower() for m in messages):
                messages.append(json.loads(await asyncio.wait_for(viewer.recv(), 30)))
            proc.send_signal(signal.SIGTERM)  # mid-speech: the words heard so far must become finals
            try:
                async for frame in viewer:
                    messages.append(json.loads(frame))
            except ConnectionClosed:
                pass
            assert viewer.close_code == 1001
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert messages[0]["type"] == "ready" and messages[-1]["type"] == "end"
    text = " ".join(m["text"] for m in messages if m["type"] == "final").lower()
    assert "my fellow" in text, text


def test_speech_detector_settings_reach_every_stream():
    """Flag over STREAMD_* over TOML, as every setting; the stream config gets them."""
    import argparse

    from streamd.service import server_config, settings

    args = argparse.Namespace(speech_threshold=0.7)
    values = settings(args, {"STREAMD_SPEECH_THRESHOLD": "0.6", "STREAMD_SPEECH_DETECTOR": "off"})
    vad = server_config(values).stream.vad
    assert vad.threshold == 0.7 and vad.detector == "off" and vad.neg_threshold == pytest.approx(0.55)
