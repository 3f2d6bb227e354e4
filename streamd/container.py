"""Audio in a container decoded as it arrives (a live websocket's WebM/Opus, Ogg/Opus, FLAC,
MP3): FFmpeg through PyAV on a thread of its own, out as 16 kHz mono float32 blocks.

Files are read whole by :mod:`streamd.audio`; a live client sends a container in pieces, and
FFmpeg's reader blocks until the next piece comes, so it runs beside the event loop. Not part of
the sans-I/O core: it owns a thread and talks to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import queue
import threading
from collections.abc import AsyncIterator

import numpy as np

from .audio import SAMPLE_RATE, AudioError

__all__ = ["ContainerStream"]


class ContainerStream:
    """Audio in a container as it arrives (WebM/Opus from a browser's MediaRecorder, Ogg/Opus,
    FLAC, MP3, ...): FFmpeg (PyAV) demuxes and decodes it on a thread of its own, since its reader
    blocks until bytes come; 16 kHz mono float32 blocks come out of :meth:`blocks`, downmixed and
    resampled as :func:`to_mono_16k` does.

    Bounded both ways: at most ``max_pending_bytes`` written and not yet read by FFmpeg (past it,
    :meth:`write` raises), and at most ``MAX_BLOCKS`` decoded blocks waiting (the thread then
    waits for the consumer, which waits for the engine)."""

    MAX_BLOCKS = 8
    PROBE_BYTES = 4096  # FFmpeg's probe reads this much before the first frame (its default: 5 MB)

    def __init__(self, max_pending_bytes: int = 4 << 20) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.samples = 0  # 16 kHz samples decoded so far
        self._loop = asyncio.get_running_loop()
        self._input: queue.Queue[bytes | None] = queue.Queue()
        self._pending = 0
        self._out: list[np.ndarray] = []
        self._cond = threading.Condition()
        self._ready = asyncio.Event()
        self._done = False
        self._aborted = False
        self._idle = False  # the thread waits for bytes: everything written so far is decoded
        self._error: AudioError | None = None
        self._buffer = b""
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="container-decoder", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        with self._cond:
            if self._pending + len(data) > self.max_pending_bytes:
                raise AudioError(f"more than {self.max_pending_bytes} bytes of audio waiting to be decoded")
            self._pending += len(data)
            self._idle = False
            self._input.put(data)  # (under the lock: the thread's idle check sees it or the flag)

    def close(self) -> None:
        """No more bytes: what is left is decoded, then :meth:`blocks` ends."""
        self._input.put(None)

    def abort(self) -> None:
        """Stop now (the client is gone): the thread ends without decoding the rest."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
        self._input.put(None)

    async def blocks(self) -> AsyncIterator[np.ndarray]:
        """Decoded audio until the stream ends; raises :class:`AudioError` if it cannot be decoded."""
        while True:
            await self._ready.wait()
            with self._cond:
                items, self._out = self._out, []
                self._ready.clear()
                done, error = self._done, self._error
                self._cond.notify_all()
            for block in items:
                yield block
            if error is not None:
                raise error
            if done:
                return

    async def settled(self, timeout_s: float = 2.0) -> None:
        """Wait until everything written so far has been decoded and taken (a Finalize)."""
        deadline = self._loop.time() + timeout_s
        while self._loop.time() < deadline:
            with self._cond:
                if (self._idle and not self._out) or self._done:
                    return
            await asyncio.sleep(0.01)

    # --- the decoding thread -------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        while not self._buffer and not self._eof:
            try:
                chunk = self._input.get_nowait()
            except queue.Empty:
                with self._cond:
                    self._idle = self._input.empty()
                chunk = self._input.get()
            if chunk is None:
                self._eof = True
            else:
                self._buffer += chunk
                with self._cond:
                    self._pending -= len(chunk)
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def _emit(self, block: np.ndarray) -> None:
        with self._cond:
            while len(self._out) >= self.MAX_BLOCKS and not self._aborted:
                self._cond.wait(0.5)
            if self._aborted:
                raise _Aborted
            self._out.append(block)
            self.samples += len(block)
        self._wake()

    def _run(self) -> None:
        import av
        import soxr

        try:
            reader = _Reader(self._read)
            with av.open(reader, options={"probesize": str(self.PROBE_BYTES), "analyzeduration": "0"}) as f:
                stream = next((s for s in f.streams if s.type == "audio"), None)
                if stream is None:
                    raise AudioError("no audio stream in the data")
                channels = stream.codec_context.channels or 1
                rate = stream.codec_context.sample_rate or SAMPLE_RATE
                convert = av.AudioResampler(format="flt", layout=stream.codec_context.layout, rate=rate)
                resample = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, quality="HQ")
                for frame in itertools.chain(f.decode(stream), [None]):  # None: flush the converter
                    for out in convert.resample(frame):
                        x = out.to_ndarray().reshape(-1, channels).mean(axis=1, dtype=np.float32)
                        self._emit(x if resample is None else resample.resample_chunk(x))
                if resample is not None:
                    self._emit(resample.resample_chunk(np.zeros(0, np.float32), last=True))
        except _Aborted:
            pass
        except AudioError as e:
            self._error = e
        except (av.FFmpegError, ValueError, RuntimeError) as e:
            self._error = AudioError(f"cannot decode audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        finally:
            with self._cond:
                self._done = True
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._ready.set)


class _Aborted(Exception):
    pass


class _Reader(io.RawIOBase):
    """A blocking, unseekable file over ``read(n)``: what PyAV reads a live stream from."""

    def __init__(self, read) -> None:
        self._read_bytes = read

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._read_bytes(len(b))
        b[: len(data)] = data
        return len(data)
