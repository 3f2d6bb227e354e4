"""Microphone capture: a fake PortAudio for the error paths, and a real PulseAudio null sink playing speech.

The real-audio tests start their own PulseAudio (a null sink whose monitor is the "microphone"),
play the JFK recording into it with ``paplay`` and capture it through PortAudio's ALSA ``pulse``
device, so the whole path (PulseAudio → ALSA plugin → PortAudio → sounddevice → asyncio) is real.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import correlate

from streamd import mic
from streamd.mic import MicError, capture, list_input_devices

from .conftest import speech_file

ROOT = Path(__file__).resolve().parents[1]
JFK = speech_file("dev_jfk_inaugural_1961")
SINK = "streamd_test"


# --- a fake sounddevice: PortAudio's behaviour without a sound card --------------------------------


class FakePortAudioError(Exception):
    pass


class FakeStream:
    """Calls the callback from its own thread at real-time pace; block ``i`` holds the value ``i``."""

    def __init__(self, sd: FakeSoundDevice, **kw) -> None:
        self.sd, self.kw = sd, kw
        self.rate, self.channels, self.frames = kw["samplerate"], kw["channels"], kw["blocksize"]
        self.closed = threading.Event()
        self.calls = 0
        self.max_call_s = 0.0
        sd.streams.append(self)

    def start(self) -> None:
        if self.sd.open_error:
            raise FakePortAudioError(self.sd.open_error)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        t = np.arange(self.frames) / self.rate
        i = 0
        while not self.closed.wait(self.frames / self.rate) and i < self.sd.blocks:
            if self.sd.tone:
                mono = 0.5 * np.sin(2 * np.pi * self.sd.tone * (t + i * self.frames / self.rate))
            else:
                mono = np.full(self.frames, float(i))
            block = np.repeat(mono[:, None], self.channels, axis=1).astype(np.float32)
            status = SimpleNamespace(input_overflow=i in self.sd.overflow_at)
            start = time.monotonic()
            self.kw["callback"](block, self.frames, None, status)
            self.max_call_s = max(self.max_call_s, time.monotonic() - start)
            self.calls += 1
            i += 1
        if not self.sd.hang:
            self.kw["finished_callback"]()

    def close(self, ignore_errors: bool = True) -> None:
        self.closed.set()


class FakeSoundDevice:
    """The slice of the sounddevice module that streamd.mic uses."""

    PortAudioError = FakePortAudioError

    def __init__(self, formats=((16000, 1),), open_error: str = "", blocks: int = 10**9, tone: float = 0) -> None:
        self.formats, self.open_error, self.blocks, self.tone = set(formats), open_error, blocks, tone
        self.overflow_at: set[int] = set()
        self.hang = False  # the device goes quiet without PortAudio noticing
        self.streams: list[FakeStream] = []
        self.devices = [
            {"name": "Fake USB Mic", "index": 0, "max_input_channels": 2, "default_samplerate": 48000.0},
            {"name": "Fake Speakers", "index": 1, "max_input_channels": 0, "default_samplerate": 48000.0},
        ]

    def query_devices(self, device=None, kind=None):
        if kind is None:
            return self.devices
        inputs = [d for d in self.devices if d["max_input_channels"]]
        found = [d for d in inputs if device in (None, d["index"]) or (isinstance(device, str) and device in d["name"])]
        if not found:
            raise ValueError(f"No input device matching {device!r}")
        return found[0]

    def check_input_settings(self, device, channels, samplerate, dtype) -> None:
        if (samplerate, channels) not in self.formats:
            raise FakePortAudioError("Invalid sample rate [PaErrorCode -9997]")

    def InputStream(self, **kw) -> FakeStream:
        return FakeStream(self, **kw)


@pytest.fixture
def fake_sd(monkeypatch: pytest.MonkeyPatch) -> FakeSoundDevice:
    sd = FakeSoundDevice()
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    return sd


async def take(n: int, **kw) -> list[np.ndarray]:
    """The first ``n`` blocks of a capture, closing it afterwards."""
    blocks = []
    async for block in capture(**kw):
        blocks.append(block)
        if len(blocks) == n:
            break
    return blocks


def test_missing_sounddevice_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # makes ``import sounddevice`` fail
    with pytest.raises(MicError, match=re.escape("pip install 'streamd[mic]'")):
        list_input_devices()
    with pytest.raises(MicError, match="pip install"):
        asyncio.run(take(1))


class _NoPortAudio:
    """A finder for ``sounddevice`` whose import fails the way it does when libportaudio is absent."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "sounddevice" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError("PortAudio library not found")


def test_missing_portaudio_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoPortAudio(), *sys.meta_path])
    with pytest.raises(MicError, match="apt install libportaudio2") as e:
        list_input_devices()
    assert "\n" not in str(e.value)


def test_unknown_device_lists_the_available_ones(fake_sd: FakeSoundDevice) -> None:
    assert list_input_devices() == ["Fake USB Mic"]
    assert (
        len(asyncio.run(take(1, device="USB"))) == len(asyncio.run(take(1, device="0"))) == 1
    )  # part of a name, index
    with pytest.raises(MicError, match=r"no input device 'Headset'; available input devices: 0: Fake USB Mic$"):
        asyncio.run(take(1, device="Headset"))


def test_busy_device_is_one_clear_line(fake_sd: FakeSoundDevice) -> None:
    fake_sd.open_error = "Device unavailable [PaErrorCode -9985]"
    with pytest.raises(MicError, match=r"cannot open input device 'Fake USB Mic' \(Device unavailable.*busy"):
        asyncio.run(take(1))
    assert fake_sd.streams[0].closed.is_set()  # a stream that failed to start is not left open


def test_native_format_is_passed_through(fake_sd: FakeSoundDevice) -> None:
    blocks = asyncio.run(take(3, block_s=0.02))
    stream = fake_sd.streams[0]
    assert (stream.rate, stream.channels, stream.frames) == (16000, 1, 320)
    assert all(b.dtype == np.float32 and b.shape == (320,) for b in blocks)
    assert [b[0] for b in blocks] == [0, 1, 2]
    assert stream.closed.is_set()


def test_other_formats_are_downmixed_and_resampled(fake_sd: FakeSoundDevice) -> None:
    """A device that only does 48 kHz stereo: a 440 Hz tone comes out as 16 kHz mono at 440 Hz, same level."""
    fake_sd.formats, fake_sd.tone = {(48000, 2)}, 440.0
    x = np.concatenate(asyncio.run(take(20, block_s=0.05)))
    assert (fake_sd.streams[0].rate, fake_sd.streams[0].channels) == (48000, 2)
    assert x.dtype == np.float32 and abs(len(x) - 20 * 800) <= 800  # the resampler holds back a few ms
    steady = x[2000:]
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady))))
    assert np.fft.rfftfreq(len(steady), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=3)
    assert np.sqrt(np.mean(steady**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_stalled_consumer_drops_oldest_audio_not_portaudio_time(
    fake_sd: FakeSoundDevice, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(mic, "QUEUE_S", 0.2)  # 4 blocks of 50 ms

    async def stall() -> list[float]:
        gen = capture(block_s=0.05)
        first = await anext(gen)
        await asyncio.sleep(0.6)  # ~12 blocks arrive; only the newest 4 are kept
        kept = [first[0]] + [(await anext(gen))[0] for _ in range(5)]
        await gen.aclose()
        return kept

    with caplog.at_level(logging.WARNING, logger="streamd.mic"):
        kept = asyncio.run(stall())
    assert kept[0] == 0 and kept[1] >= 6, kept  # blocks 1.. were dropped
    assert kept[1:] == list(range(int(kept[1]), int(kept[1]) + 5)), kept  # then contiguous again
    assert any("s of audio dropped" in r.getMessage() for r in caplog.records)
    assert fake_sd.streams[0].max_call_s < 0.05  # the PortAudio thread never waited the 0.6 s on the consumer


def test_input_overflow_flags_are_reported(fake_sd: FakeSoundDevice, caplog: pytest.LogCaptureFixture) -> None:
    fake_sd.overflow_at = {1, 2}
    with caplog.at_level(logging.WARNING, logger="streamd.mic"):
        asyncio.run(take(4, block_s=0.02))
    assert any("2 input overflows" in r.getMessage() for r in caplog.records), caplog.text


def test_cancelling_the_consumer_closes_the_stream(fake_sd: FakeSoundDevice) -> None:
    async def consume_then_cancel() -> None:
        task = asyncio.create_task(take(10**6))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(consume_then_cancel())
    assert fake_sd.streams[0].closed.is_set()


def test_device_that_stops_is_an_error_not_a_hang(fake_sd: FakeSoundDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_sd.blocks = 3  # then PortAudio reports the stream finished (device unplugged)
    with pytest.raises(MicError, match="stopped delivering audio"):
        asyncio.run(take(100, block_s=0.02))
    fake_sd.hang = True  # finished without PortAudio noticing: the watchdog fires
    monkeypatch.setattr(mic, "STALL_S", 0.3)
    with pytest.raises(MicError, match="no audio from input device 'Fake USB Mic'"):
        asyncio.run(take(100, block_s=0.02))


# --- the real sounddevice and PortAudio -------------------------------------------------------------


@pytest.fixture(scope="module")
def sd():
    try:
        import sounddevice
    except ImportError:
        pytest.skip("sounddevice is not installed (pip install 'streamd[mic]')")
    except OSError:
        pytest.skip("the PortAudio library is not installed (apt install libportaudio2)")
    return sounddevice


def test_real_portaudio_lists_names_and_rejects_unknown_devices(sd) -> None:
    names = list_input_devices()
    assert isinstance(names, list) and all(isinstance(n, str) and n for n in names)
    with pytest.raises(MicError, match="no input device 'no-such-microphone-42'; available input devices: ") as e:
        asyncio.run(take(1, device="no-such-microphone-42"))
    assert "\n" not in str(e.value)


@dataclass
class Pulse:
    env: dict[str, str]  # what a client process needs to reach this server and its null sink


def _restart_portaudio(sd) -> None:
    """PortAudio lists devices once, at initialisation: re-scan so the ALSA ``pulse`` device is seen."""
    sd._terminate()
    sd._initialize()


@pytest.fixture
def pulse(sd, tmp_path: Path) -> Iterator[Pulse]:
    """A private PulseAudio server (as root too) with one null sink; its monitor is the default source."""
    exe, paplay = shutil.which("pulseaudio"), shutil.which("paplay")
    if not exe or not paplay:
        pytest.skip("pulseaudio/paplay are not installed (apt install pulseaudio pulseaudio-utils libasound2-plugins)")
    home = tmp_path / "pulse"
    home.mkdir(mode=0o700)
    sock = home / "native"
    server_env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home), "XDG_CONFIG_HOME": str(home)}
    server_env.pop("PULSE_SERVER", None)
    log = (home / "server.log").open("wb")
    modules = [
        f"module-null-sink sink_name={SINK} rate=48000 channels=2",
        f"module-native-protocol-unix auth-anonymous=1 socket={sock}",
    ]
    proc = subprocess.Popen(
        [exe, "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no", "-n", "--log-target=stderr"]
        + [arg for module in modules for arg in ("-L", module)],
        env=server_env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    client_env = {"PULSE_SERVER": f"unix:{sock}", "PULSE_SINK": SINK, "PULSE_SOURCE": f"{SINK}.monitor"}
    saved = {k: os.environ.get(k) for k in client_env}
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pulseaudio did not start: {(home / 'server.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        os.environ.update(client_env)
        _restart_portaudio(sd)
        if "pulse" not in list_input_devices():
            pytest.skip(
                f"PortAudio sees no ALSA 'pulse' device (apt install libasound2-plugins): {list_input_devices()}"
            )
        yield Pulse({**os.environ, **client_env})
    finally:
        stop(proc)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _restart_portaudio(sd)


def play(pulse: Pulse, wav: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [shutil.which("paplay") or "paplay", f"--device={SINK}", str(wav)],
        env=pulse.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def best_match(captured: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    """Normalised cross-correlation of the capture with the reference at the best lag, and that lag."""
    corr = correlate(captured, reference, mode="full", method="fft")
    lag = int(corr.argmax()) - (len(reference) - 1)  # captured[lag + k] lines up with reference[k]
    a = captured[max(lag, 0) :]
    b = reference[max(-lag, 0) :]
    n = min(len(a), len(b))
    a, b = a[:n].astype(np.float64), b[:n].astype(np.float64)
    denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return (float(np.dot(a, b) / denom) if denom > 1e-9 else 0.0), lag


def test_best_match_fails_on_silence_and_noise() -> None:
    reference, _ = sf.read(str(JFK), dtype="float32")
    noise = np.random.default_rng(0).normal(0, 0.1, 16000 * 4).astype(np.float32)
    assert best_match(np.zeros(16000 * 4, np.float32), reference)[0] == 0.0
    assert best_match(noise, reference)[0] < 0.2
    shifted = np.concatenate([np.zeros(4000, np.float32), reference[: 16000 * 4]])
    assert best_match(shifted, reference) == (pytest.approx(1.0), 4000)


@pytest.mark.parametrize("path", ["native", "resampled"])
def test_captures_speech_played_into_pulseaudio(pulse: Pulse, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 s of the JFK recording, played into the null sink, captured through PortAudio: it is the recording."""
    if path == "resampled":  # as a device without 16 kHz mono: 48 kHz stereo, downmixed and resampled here
        monkeypatch.setattr(mic, "_choose_format", lambda sd, info: (48000, 2))
    reference, rate = sf.read(str(JFK), dtype="float32")
    assert rate == 16000

    async def record(seconds: float) -> np.ndarray:
        blocks, player = [], None
        try:
            async for block in capture("pulse", block_s=0.05):
                if player is None:  # the stream runs: start the "speaker"
                    player = play(pulse, JFK)
                blocks.append(block)
                if sum(map(len, blocks)) >= seconds * 16000:
                    break
        finally:
            if player is not None:
                player.kill()
                player.wait()
        return np.concatenate(blocks)

    captured = asyncio.run(record(5.0))
    assert captured.dtype == np.float32 and captured.ndim == 1
    score, lag = best_match(captured, reference)
    print(f"correlation {score:.4f}, lag {lag / 16000:.3f} s")
    assert score > 0.9, f"captured audio does not match the recording: correlation {score:.3f} at lag {lag}"
    assert 0 <= lag < 16000 * 2.5, f"playback reached the capture {lag / 16000:.2f} s after it started"
    gain = np.std(captured[lag : lag + 16000 * 2]) / np.std(reference[: 16000 * 2])
    assert 0.8 < gain < 1.25, f"level changed on the way: gain {gain:.2f}"


# --- end to end: null sink → examples/mic_demo.py → streamd serve ---------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def health(port: int) -> dict | None:
    """The daemon's ``GET /healthz`` JSON, or None while it does not answer 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return json.load(r) if r.status == 200 else None
    except (OSError, ValueError):
        return None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_mic_demo_captions_speech_through_the_daemon(pulse: Pulse, tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("streamd.server") is None:
        pytest.skip("the daemon (streamd/server.py, `streamd serve`) is not there yet")
    port = free_port()
    daemon_log = (tmp_path / "daemon.log").open("w+")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "streamd", "serve", "--port", str(port)],
        cwd=ROOT,
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
        env=pulse.env,
    )
    demo = player = None
    try:
        deadline = time.monotonic() + 30
        while True:
            if daemon.poll() is not None or time.monotonic() > deadline:
                daemon_log.seek(0)
                pytest.fail(f"streamd serve did not become healthy: {daemon_log.read()[-2000:]}")
            if health(port):
                break
            time.sleep(0.2)

        url = f"ws://127.0.0.1:{port}/v1/stream"
        demo = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "examples" / "mic_demo.py"),
                "--device",
                "pulse",
                "--source",
                "e2e",
                "--url",
                url,
            ],
            cwd=ROOT,
            env=pulse.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 15  # the demo opens the microphone, then connects and starts its stream
        while not any("e2e" in stream.values() for stream in (health(port) or {}).get("streams", [])):
            assert demo.poll() is None, demo.communicate()
            assert time.monotonic() < deadline, "the demo's stream never showed up in /healthz"
            time.sleep(0.1)
        player = play(pulse, JFK)
        assert player.wait(20) == 0, player.stderr.read() if player.stderr else ""
        time.sleep(0.5)
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=25)
    finally:
        for proc in (player, demo, daemon):
            if proc is not None:
                stop(proc)
        daemon_log.close()
    print(f"demo stdout:\n{out}\ndemo stderr:\n{err}")  # shown when the test fails
    assert demo.returncode == 0, f"exit {demo.returncode}; stderr: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines and not any("\r" in line or "\x1b" in line for line in lines), out  # not a tty: finals only
    reference = set(words(JFK.with_suffix(".txt").read_text()))
    heard = set(words(out))
    assert len(reference & heard) >= 0.5 * len(reference), f"captions {out!r} miss the reference words"


def test_mic_demo_errors_are_one_line_and_exit_1(pulse: Pulse) -> None:
    def demo(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(ROOT / "examples" / "mic_demo.py"), *args]
        return subprocess.run(command, cwd=ROOT, env=pulse.env, capture_output=True, text=True, timeout=30)

    listed = demo("--list-devices")
    assert listed.returncode == 0 and "pulse" in listed.stdout.splitlines(), listed
    for args, message in [
        (["--device", "no-such-mic"], "mic_demo: no input device 'no-such-mic'; available input devices: "),
        (["--device", "pulse", "--url", f"ws://127.0.0.1:{free_port()}/v1/stream"], "mic_demo: cannot reach the"),
    ]:
        result = demo(*args)
        assert result.returncode == 1, result
        assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
        assert result.stdout == ""
