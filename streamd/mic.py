"""Microphone capture: 16 kHz mono float32 blocks from PortAudio, delivered on the asyncio loop.

``sounddevice`` is an optional dependency (``pip install 'streamd[mic]'``) and is imported only
when a microphone is used, so the daemon runs on machines without PortAudio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np

from .audio import SAMPLE_RATE

__all__ = ["SAMPLE_RATE", "MicError", "capture", "list_input_devices"]

QUEUE_S = 1.0  # audio held for a stalled consumer before the oldest is dropped
STALL_S = 5.0  # no block from PortAudio for this long means the device is gone
LOG_EVERY_S = 5.0  # at most one overflow warning per this many seconds

log = logging.getLogger("streamd.mic")


class MicError(Exception):
    """A microphone cannot be used; ``str()`` is one line saying why and what to do."""


def _sounddevice() -> Any:
    """Import sounddevice late: both a missing package and a missing PortAudio are common and fixable."""
    try:
        import sounddevice
    except ImportError:
        raise MicError("microphone support needs sounddevice: pip install 'streamd[mic]'") from None
    except OSError as e:  # sounddevice raises OSError when it cannot load the PortAudio library
        raise MicError(f"the PortAudio library is missing ({e}): apt install libportaudio2") from None
    return sounddevice


def _inputs(sd: Any) -> list[dict]:
    """PortAudio's devices that can record, in PortAudio's order."""
    return [d for d in sd.query_devices() if d["max_input_channels"] > 0]


def list_input_devices() -> list[str]:
    """Names of the devices that can record; any of them, a unique part of one, or its PortAudio index selects it."""
    return [d["name"] for d in _inputs(_sounddevice())]


def _available(sd: Any) -> str:
    names = [f"{d['index']}: {d['name']}" for d in _inputs(sd)]
    return "available input devices: " + (", ".join(names) if names else "none")


def _find_device(sd: Any, device: str | int | None) -> dict:
    """The device's PortAudio info, or a MicError that lists what exists instead."""
    if isinstance(device, str) and device.isdigit():  # "--mic 3" from a command line means index 3
        device = int(device)
    try:
        return sd.query_devices(device, kind="input")
    except (ValueError, sd.PortAudioError) as e:
        if device is None:
            what = "no default input device"
        elif "multiple" in str(e).lower():
            what = f"{device!r} matches more than one input device: give more of the name, or the index"
        else:
            what = f"no input device {device!r}"
        raise MicError(f"{what}; {_available(sd)}") from None


def _choose_format(sd: Any, info: dict) -> tuple[int, int]:
    """16 kHz mono when the device does it (no conversion), else its own rate with as few channels as it allows."""
    most = int(info["max_input_channels"])
    channel_options = sorted({1, min(2, most), most})
    for rate in (SAMPLE_RATE, int(info["default_samplerate"])):
        for channels in channel_options:
            try:
                sd.check_input_settings(info["index"], channels=channels, samplerate=rate, dtype="float32")
            except (ValueError, sd.PortAudioError):
                continue
            return rate, channels
    return int(info["default_samplerate"]), most  # let InputStream say what is wrong


class _Overflows:
    """Counts lost audio and logs it rate-limited, so a stalled consumer does not flood the log."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dropped_s = 0.0  # dropped here because the consumer did not keep up
        self.input_overflows = 0  # blocks PortAudio flagged as overflowed (lost before they reached us)
        self._logged = (0.0, 0)
        self._next_log = 0.0

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if (self.dropped_s, self.input_overflows) == self._logged or (now < self._next_log and not force):
            return
        self._logged = (self.dropped_s, self.input_overflows)
        self._next_log = now + LOG_EVERY_S
        log.warning(
            "microphone %r: %.2f s of audio dropped (consumer too slow), %d input overflows (PortAudio)",
            self.name,
            self.dropped_s,
            self.input_overflows,
        )


async def capture(device: str | int | None = None, block_s: float = 0.05) -> AsyncGenerator[np.ndarray, None]:
    """Yield the microphone as 16 kHz mono float32 blocks of about ``block_s`` seconds, until closed.

    PortAudio's thread never waits on the consumer: blocks go through a queue holding about a second,
    and when it is full the oldest block is dropped and counted (logged as a warning). Closing the
    generator (``aclose()``, ``break`` in ``async for``, cancellation) stops and closes the stream.
    """
    sd = _sounddevice()
    info = _find_device(sd, device)
    name = info["name"]
    rate, channels = _choose_format(sd, info)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[np.ndarray | None] = asyncio.Queue(maxsize=max(2, math.ceil(QUEUE_S / block_s)))
    overflows = _Overflows(name)

    def deliver(block: np.ndarray | None, overflowed: bool) -> None:  # on the loop thread
        overflows.input_overflows += overflowed
        while queue.full():
            old = queue.get_nowait()
            overflows.dropped_s += 0.0 if old is None else len(old) / rate
        queue.put_nowait(block)
        if overflowed or overflows.dropped_s:
            overflows.report()

    def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:  # PortAudio's thread
        block = indata[:, 0].copy() if channels == 1 else indata.mean(axis=1, dtype=np.float32)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the stream is being torn down
            loop.call_soon_threadsafe(deliver, block, bool(status.input_overflow))

    def finished() -> None:  # PortAudio's thread: the stream stopped, by us or by the device going away
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, None, False)

    stream = None
    try:
        stream = sd.InputStream(
            device=info["index"],
            samplerate=rate,
            channels=channels,
            dtype="float32",
            blocksize=max(1, round(rate * block_s)),
            callback=callback,
            finished_callback=finished,
        )
        stream.start()
    except (ValueError, sd.PortAudioError) as e:
        if stream is not None:
            stream.close(ignore_errors=True)
        raise MicError(f"cannot open input device {name!r} ({e}): is it busy or in use by another program?") from None

    log.info(
        "microphone %r open: %d Hz, %d channel(s)%s", name, rate, channels, "" if rate == SAMPLE_RATE else ", resampled"
    )
    resampler = None
    if rate != SAMPLE_RATE:
        import soxr

        resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    try:
        while True:
            try:
                block = await asyncio.wait_for(queue.get(), timeout=STALL_S)
            except TimeoutError:
                raise MicError(f"no audio from input device {name!r} for {STALL_S:g} s: was it unplugged?") from None
            if block is None:
                raise MicError(f"input device {name!r} stopped delivering audio: was it unplugged?")
            if resampler is not None:
                block = resampler.resample_chunk(block)
                if not len(block):
                    continue
            yield block
    finally:
        stream.close(ignore_errors=True)
        overflows.report(force=True)
