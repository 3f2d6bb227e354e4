"""Raw TCP ingest (``--tcp-port``): s16le 16 kHz mono in, protocol v1's messages out as
newline-delimited JSON. For ``ffmpeg ... | nc``: no start message, no controls; the connection's
end is the end of the audio. An adapter like the others, on :meth:`Daemon.serve_live`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING

from .hub import Outbox, Source
from .protocol import AudioDecoder, AudioFormat
from .sender import TcpTransport

if TYPE_CHECKING:
    from .server import Daemon

__all__ = ["serve"]

CHUNK_BYTES = 3200  # 100 ms of s16le at 16 kHz


def _as_sent(msg: dict) -> list[str]:
    """Protocol v1's messages as they are, one JSON line each."""
    return [json.dumps(msg)]


async def serve(daemon: Daemon, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def read(source: Source, outbox: Outbox) -> None:
        decoder = AudioDecoder(AudioFormat(), carry=True)
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(CHUNK_BYTES):
                samples, _ = decoder.decode(chunk)
                await daemon.feed(source, samples)

    await daemon.serve_live("tcp", None, TcpTransport(writer), _as_sent, read)
    with contextlib.suppress(ConnectionError):
        writer.close()
        await writer.wait_closed()
