#!/usr/bin/env python3
"""Live captions from the microphone in a terminal: a small reference client for streamd's protocol v1.

    streamd serve &                          # the daemon, on ws://127.0.0.1:8765 by default
    python examples/mic_demo.py              # speak; Ctrl-C to stop
    python examples/mic_demo.py --list-devices
    python examples/mic_demo.py --device pulse --url ws://meeting-box:8765/v1/stream

Each utterance is one line: its finals, then the current partial (dimmed) redrawn in place on a
terminal; when stdout is not a terminal, each utterance is printed once it ends. Needs the ``mic``
extra: ``pip install 'streamd[mic]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
from collections.abc import AsyncGenerator

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from streamd.mic import MicError, capture, list_input_devices

DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"
END_TIMEOUT_S = 10.0  # after Ctrl-C, how long to wait for the daemon's last finals


class Captions:
    """One line per utterance: its finals so far, then the current partial (dimmed) redrawn in place
    on a terminal. Finals come a few words at a time; the line ends when the speaker pauses (the
    daemon's ``vad`` message). Off a terminal, each utterance is printed once, when it ends."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.line = ""  # the finals of the current utterance

    def _draw(self, partial: str = "") -> None:
        if not self.tty:
            return
        width = shutil.get_terminal_size().columns - 1
        text = (self.line + " " + partial).strip()
        if len(text) > width:  # a wrapped line cannot be redrawn: show its end
            text = "…" + text[-(width - 1) :]
        cut = max(0, len(text) - len(partial)) if partial else len(text)
        sys.stdout.write("\r\x1b[K" + text[:cut] + "\x1b[2m" + text[cut:] + "\x1b[0m")
        sys.stdout.flush()

    def partial(self, text: str) -> None:
        self._draw(text)

    def final(self, text: str) -> None:
        self.line = (self.line + " " + text).strip()
        self._draw()

    def pause(self) -> None:
        """The speaker paused: the utterance's line is done."""
        if self.line:
            sys.stdout.write(("\r\x1b[K" if self.tty else "") + self.line + "\n")
            sys.stdout.flush()
        self.line = ""

    def close(self) -> None:
        """Ends the current line, so what is printed next starts on a clean one."""
        self.pause()
        if self.tty:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()


async def send_audio(ws: ClientConnection, mic: AsyncGenerator[np.ndarray, None], stopping: asyncio.Event) -> None:
    """Microphone blocks (50 ms of 16 kHz float32) as binary frames; then ``stop``."""
    async for block in mic:
        await ws.send(block.tobytes())
        if stopping.is_set():
            break
    await mic.aclose()  # release the microphone before waiting for the last finals
    await ws.send(json.dumps({"type": "stop"}))


async def show_captions(ws: ClientConnection, captions: Captions) -> bool:
    """Prints the daemon's messages; True once ``end`` arrives, False if the connection closes first."""
    async for frame in ws:
        msg = json.loads(frame)
        kind = msg.get("type")
        if kind == "partial":
            captions.partial(msg["text"].strip())
        elif kind == "final":
            captions.final(msg["text"].strip())
        elif kind == "vad" and not msg["speech"]:
            captions.pause()
        elif kind == "error":
            captions.close()
            print(f"mic_demo: the daemon says {msg.get('code')}: {msg.get('message')}", file=sys.stderr)
        elif kind == "end":
            captions.pause()
            return True
    return False


async def run(args: argparse.Namespace) -> int:
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stopping.set)
    mic = capture(args.device, block_s=0.05)
    try:
        first = await anext(mic)  # opens the microphone now, so a bad device fails before we connect
    except MicError as e:
        return fail(str(e))
    try:
        ws = await connect(args.url, open_timeout=5)
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
        await mic.aclose()
        return fail(f"cannot reach the streamd daemon at {args.url}: {e}")

    captions = Captions()
    async with ws:
        audio = {"encoding": "pcm_f32le", "sample_rate": 16000, "channels": 1}
        await ws.send(json.dumps({"type": "start", "protocol": 1, "source": args.source, "audio": audio}))
        await ws.send(first.tobytes())
        sender = asyncio.create_task(send_audio(ws, mic, stopping))
        receiver = asyncio.create_task(show_captions(ws, captions))
        interrupted = asyncio.create_task(stopping.wait())
        await asyncio.wait({sender, receiver, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        stopping.set()  # Ctrl-C, or the daemon closed, or the microphone failed: stop sending either way
        try:
            await sender  # stops the microphone, then sends {"type": "stop"}
            if not await asyncio.wait_for(receiver, END_TIMEOUT_S):  # the remaining finals, then "end"
                return fail("the daemon closed the connection before the end of the stream", captions)
        except MicError as e:
            return fail(str(e), captions)
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else "none: the connection dropped"
            return fail(f"the daemon closed the connection (close code {code})", captions)
        except TimeoutError:
            return fail(f"no end of stream from the daemon within {END_TIMEOUT_S:.0f} s", captions)
        finally:
            for task in (sender, receiver, interrupted):
                task.cancel()
            await asyncio.gather(sender, receiver, interrupted, return_exceptions=True)
            await mic.aclose()
    captions.close()
    return 0


def fail(message: str, captions: Captions | None = None) -> int:
    """One line on stderr and exit status 1: what users see instead of a traceback."""
    if captions is not None:
        captions.close()
    print(f"mic_demo: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Live captions from a microphone through a running streamd daemon.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the daemon's stream endpoint (default {DEFAULT_URL})")
    parser.add_argument("--device", help="input device: a name, part of one, or a PortAudio index (default: system's)")
    parser.add_argument("--source", default="mic-demo", help="source id for viewers at /v1/captions (default mic-demo)")
    parser.add_argument("--list-devices", action="store_true", help="list the input devices and exit")
    args = parser.parse_args(argv)
    if args.list_devices:
        try:
            print("\n".join(list_input_devices()) or "no input devices found")
        except MicError as e:
            return fail(str(e))
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
