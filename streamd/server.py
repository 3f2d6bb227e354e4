"""The asyncio daemon: protocol v1 over websockets, HTTP on the same port, TCP ingest, mic, files.

A thin shell. Each source's audio goes through :class:`~streamd.protocol.AudioDecoder` into its
:class:`~streamd.hub.Source`; the :class:`~streamd.scheduler.Scheduler` decodes on the shared
engine off the event loop; messages go out through each client's bounded
:class:`~streamd.hub.Outbox`. Ingest waits (and so pushes back on the client) only when a
stream's window is full, which happens only when the engine cannot keep up.

A websocket client that drops without ``stop`` leaves its session waiting ``resume_s`` seconds:
its last utterance is finalised at once, and a client that reconnects with the session id and
the last ``seq`` it saw (the resume extension of protocol v1) gets the finals it missed, then
goes on feeding the same stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse

from whisper_engine.engine import Engine

from . import deepgram_listen, openai_realtime, tcp_ingest, wyoming_asr
from .audio import SAMPLE_RATE
from .auth import AccessPolicy, is_loopback_address
from .files import FileQueue
from .http import HttpLimits, HttpSide
from .hub import Hub, Outbox, Source
from .metrics import Metrics
from .protocol import (
    SOURCE_ID,
    TRY_AGAIN_LATER,
    AudioDecoder,
    AudioFormat,
    ProtocolError,
    bad_query_source,
    parse_control,
    parse_start,
    with_query_source,
)
from .scheduler import Scheduler
from .sender import RenderingTransport, Transport, WebsocketTransport, error_message, start_sender
from .sessions import DetachedSessions
from .status import Status
from .store import PURGE_EVERY_S, TranscriptStore
from .stream import StreamConfig, VadChange
from .web import WEBSOCKET_PATHS, WebApi

__all__ = ["Daemon", "ServerConfig"]

log = logging.getLogger(__name__)

CHUNK = 1600  # 100 ms: how a file source is fed
DRAIN_REQUEST_S = 300.0  # ``streamd drain`` without --timeout-s: long enough for a meeting to wind up


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    tcp_port: int | None = None
    wyoming_port: int | None = None  # Wyoming speech-to-text (Home Assistant); 10300 by convention
    wyoming_host: str = "127.0.0.1"  # Wyoming has no auth: off loopback only with wyoming_allow
    wyoming_allow: str = ""  # comma-separated client addresses/networks allowed besides loopback
    wyoming_zeroconf: bool = False  # announce the Wyoming port over mDNS (needs the zeroconf package)
    wyoming_live_transcript: bool = False  # the transcript: the live words at once, not a whole decode
    max_frame_bytes: int = 1 << 20  # one audio frame (the protocol sends at most 1 s)
    max_queue: int = 256  # messages waiting for one client before it is cut off
    max_connections: int = 64
    max_streams: int = 16
    start_timeout_s: float = 10.0  # for the start frame
    workers: int = 1  # engine threads (streams decoded side by side)
    max_batch: int = 64  # jobs of different streams per engine run, on a backend that batches (cuda)
    max_buffer_s: float = 28.0  # a stream's window past which ingest waits for the engine
    slow_client_grace_s: float = 5.0  # to deliver the slow_client error before the socket is dropped
    shutdown_timeout_s: float = 30.0  # to finalise every stream on SIGTERM
    drain_s: float = 0.0  # on SIGTERM, wait this long for live streams to end first (behind a proxy)
    token: str | None = None  # when set, every request must carry it (Bearer header or ?token=)
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed besides the page's own
    tls_cert: str | None = None
    tls_key: str | None = None
    ping_interval_s: float = 20.0  # keepalive: a peer that does not answer within as long is dropped
    resume_s: float = 30.0  # a dropped stream client's session waits this long for it to resume (0: never)
    max_detached: int = 16  # sessions waiting for a resume at once (the oldest is finalised past it)
    max_upload_bytes: int = 25 * 1024 * 1024  # an HTTP request body (a file to transcribe): OpenAI's limit
    max_file_requests: int = 8  # file transcriptions waiting or running; past it: 429
    state_dir: str | None = None  # where finals are kept across restarts (transcripts.db); None: nowhere
    retention_days: float = 30.0  # sessions older than this are deleted from the store
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        for key in ("workers", "max_batch", "max_queue", "max_connections", "max_streams", "max_frame_bytes",
                    "max_detached", "max_upload_bytes", "max_file_requests"):  # fmt: skip
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.ping_interval_s <= 0:
            raise ValueError(f"ping_interval_s must be positive, got {self.ping_interval_s}")
        if self.retention_days < 0:
            raise ValueError(f"retention_days must be 0 (keep nothing) or more, got {self.retention_days}")
        if self.resume_s < 0:
            raise ValueError(f"resume_s must be 0 (off) or more, got {self.resume_s}")
        if self.drain_s < 0:
            raise ValueError(f"drain_s must be 0 (no drain) or more, got {self.drain_s}")
        if self.wyoming_port is not None and not 0 <= self.wyoming_port <= 65535:
            raise ValueError(f"wyoming_port must be 0..65535, got {self.wyoming_port}")
        wyoming_asr.parse_networks(self.wyoming_allow)  # a bad network is an error now, not at a connection
        if not is_loopback_address(self.wyoming_host) and not self.wyoming_allow:
            raise ValueError(
                f"wyoming_host {self.wyoming_host!r} is not loopback, and Wyoming has no authentication: "
                "set wyoming_allow to the client addresses (Home Assistant's) that may connect"
            )


class Daemon:
    """``await Daemon(engine, config).start()``; ``await daemon.shutdown()`` finalises everything."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.config = c = config or ServerConfig()
        store = None
        if c.state_dir and c.retention_days > 0:
            store = TranscriptStore(Path(c.state_dir) / "transcripts.db", c.retention_days * 86400)
        self.hub = Hub(lambda: {"model": engine.model_name, "devices": self.status.devices}, c.stream,
                       c.max_streams, store)  # fmt: skip
        self.scheduler = Scheduler(engine, workers=c.workers, max_batch=c.max_batch)
        self.access = AccessPolicy(c.token, c.allowed_origins)
        self.detached = DetachedSessions(c.resume_s, c.max_detached, c.max_streams)
        self.status = Status(engine, self.scheduler, self.hub, self.detached)
        self.metrics = Metrics(self.status)
        self.hub.on_final = self.metrics.final_latency.observe
        self.scheduler.on_job = self.metrics.observe_job
        self.scheduler.on_batch = self.metrics.batch_size.observe
        self._server: Server | None = None
        self._tcp: asyncio.Server | None = None
        self._wyoming: asyncio.Server | None = None
        self._announcer: wyoming_asr.WyomingAnnouncer | None = None
        self.wyoming_connections: set[asyncio.StreamWriter] = set()
        self.wyoming_busy: set[asyncio.Task] = set()  # Wyoming handlers decoding a whole command
        self._readers: dict[Source, asyncio.Task] = {}  # ingest tasks, cancelled on shutdown
        self._sessions: set[asyncio.Task] = set()  # websocket sessions (they outlive connections)
        self._viewers: dict[Outbox, asyncio.Task] = {}  # viewer outboxes and their senders
        self._tasks: set[asyncio.Task] = set()  # file and mic sources
        self.files = FileQueue(
            engine, c.stream.vad, c.max_file_requests, idle_threads=min(len(os.sched_getaffinity(0)), 4),
            live_idle=lambda: not self.hub.sources,
        )  # fmt: skip
        self.metrics.watch_files(self.files)
        self.drain_requested = asyncio.Event()  # ``POST /v1/drain`` (``streamd drain``); the service stops after
        self.drain_timeout_s = DRAIN_REQUEST_S  # how long that drain may take (the request may say)
        self.web = WebApi(self.access, self.status, self.metrics, self.hub, self.files, engine.model_name,
                          on_drain=self.request_drain)  # fmt: skip
        self.http = HttpSide(self.web.handle, HttpLimits(max_body_bytes=c.max_upload_bytes,
                                                         max_connections=c.max_connections))  # fmt: skip
        self._purger: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, listen: list[socket.socket] | None = None) -> None:
        """Bind the configured ports, or serve on ``listen`` (sockets systemd passed in: the
        first for websockets + HTTP, a second for TCP ingest)."""
        self.scheduler.start()
        c = self.config
        listen = listen or []
        tls = None
        if c.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(c.tls_cert, c.tls_key)
        if c.token is None:
            for sock in listen:
                if not is_loopback_address(sock.getsockname()[0]):
                    raise PermissionError(f"socket {_address(sock)} is not loopback: set token_file to listen there")
        where = {"sock": listen[0]} if listen else {"host": c.host, "port": c.port}
        self._server = await serve(
            self._websocket,
            **where,
            ssl=tls,
            process_request=self._upgrade,
            select_subprotocol=_select_subprotocol,
            create_connection=self.http.create_connection,  # type: ignore[arg-type]  # HTTP first
            ping_interval=c.ping_interval_s,
            ping_timeout=c.ping_interval_s,
            max_size=2 * c.max_frame_bytes,  # over our limit: an error message; over this: close 1009
            server_header="streamd",
            # No permessage-deflate: audio does not compress, and inflating every frame cost 5% of
            # the event loop at 64 streams; captions are a few hundred bytes.
            compression=None,
        )
        if len(listen) > 1:
            self._tcp = await asyncio.start_server(lambda r, w: tcp_ingest.serve(self, r, w), sock=listen[1])
        elif c.tcp_port is not None:
            self._tcp = await asyncio.start_server(lambda r, w: tcp_ingest.serve(self, r, w), c.host, c.tcp_port)
        if c.wyoming_port is not None:
            self._wyoming = await asyncio.start_server(
                lambda r, w: wyoming_asr.serve(self, r, w), c.wyoming_host, c.wyoming_port,
                limit=wyoming_asr.MAX_HEADER_BYTES,
            )  # fmt: skip
            if c.wyoming_zeroconf:
                self._announcer = wyoming_asr.WyomingAnnouncer(self.wyoming_port, c.wyoming_host)
                await self._announcer.start()
        if self.hub.store is not None:
            self._purger = asyncio.create_task(self._purge_store())
            log.info("finals kept in %s for %g days", self.hub.store.path, c.retention_days)
        log.info("listening on %s", ", ".join(self.addresses))

    async def _purge_store(self) -> None:
        """Delete sessions past the retention, hourly (and at start, when the store opens)."""
        store = self.hub.store
        assert store is not None
        while True:
            await asyncio.sleep(PURGE_EVERY_S)
            try:
                store.purge()
            except sqlite3.Error:
                log.exception("could not purge old sessions from %s", store.path)

    @property
    def stopping(self) -> bool:
        return self.status.stopping

    @property
    def draining(self) -> bool:
        return self.status.draining

    def request_drain(self, timeout_s: float | None = None) -> None:
        """From now on no new sources; the service then waits for the live ones, at most
        ``timeout_s`` (``streamd drain``)."""
        if timeout_s is not None:
            self.drain_timeout_s = timeout_s
        if not self.draining:
            self.status.draining = True
            log.info("draining: %d stream(s) may finish; no new ones", len(self.hub.sources))
        self.drain_requested.set()

    async def drain(self, timeout_s: float) -> None:
        """Take no new sources (``/healthz`` answers 503 ``draining``, so a proxy sends them to
        another node) and wait, at most ``timeout_s``, until every live session has ended: its
        client stopped, or it went and was not resumed. :meth:`shutdown` finalises what is left."""
        if self.stopping:
            return
        self.request_drain()
        deadline = time.monotonic() + timeout_s
        while self.hub.sources and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.hub.sources:
            log.info("drain time is up (%g s): finalising %s", timeout_s, ", ".join(self.hub.sources))

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def tcp_port(self) -> int | None:
        return self._tcp.sockets[0].getsockname()[1] if self._tcp is not None else None

    @property
    def wyoming_port(self) -> int | None:
        return self._wyoming.sockets[0].getsockname()[1] if self._wyoming is not None else None

    @property
    def addresses(self) -> list[str]:
        scheme = "https" if self.config.tls_cert else "http"
        out = [f"{scheme}://{_address(self._server.sockets[0])}"] if self._server else []
        if self._tcp is not None:
            out.append(f"tcp://{_address(self._tcp.sockets[0])}")
        if self._wyoming is not None:
            out.append(f"wyoming tcp://{_address(self._wyoming.sockets[0])}")
        return out

    async def shutdown(self) -> None:
        """Stop accepting, finalise every stream (its last finals and ``end`` reach its clients),
        then close every connection with 1001."""
        if self.stopping:
            return
        self.status.stopping = True
        log.info("shutting down: finalising %d stream(s)", len(self.hub.sources))
        if self._server is not None:
            self._server.close(close_connections=False)
        if self._tcp is not None:
            self._tcp.close()
        if self._wyoming is not None:
            self._wyoming.close()
        if self._announcer is not None:
            await self._announcer.stop()
        for task in [*self._readers.values(), *self._tasks]:
            task.cancel()
        self.detached.cancel_all()
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        while self.hub.sources and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.hub.sources:
            log.warning("streams not finalised in time: %s", ", ".join(self.hub.sources))
        if self.wyoming_busy:  # a command's whole decode: its transcript goes out before the close
            await asyncio.wait(list(self.wyoming_busy), timeout=10)
        for writer in list(self.wyoming_connections):  # idle between transcriptions: nothing to finish
            writer.close()
        for outbox in self._viewers:
            outbox.close()
        if self._viewers:
            await asyncio.wait(list(self._viewers.values()), timeout=5)
        await self.http.close(timeout=10)
        self.files.close()
        if self._server is not None:
            # Server.close() is idempotent: the close above stopped the listener; now the rest.
            closing = [asyncio.create_task(ws.close(CloseCode.GOING_AWAY)) for ws in self._server.connections]
            if closing:
                await asyncio.wait(closing, timeout=10)
            await self._server.wait_closed()
        if self._tcp is not None:
            await self._tcp.wait_closed()
        if self._wyoming is not None:
            await self._wyoming.wait_closed()
        await self.scheduler.stop()
        if self._purger is not None:
            self._purger.cancel()
        if self.hub.store is not None:
            self.hub.store.close()

    # --- HTTP --------------------------------------------------------------------------------

    def _upgrade(self, connection: ServerConnection, request: WsRequest) -> WsResponse | None:
        """A websocket handshake (plain HTTP never reaches here: :mod:`streamd.web` serves it)."""
        url = urlsplit(request.path)
        refusal = self.access.check(request.headers, url.query)
        if refusal is not None:
            response = connection.respond(refusal.status, refusal.body)
            for name, value in refusal.headers.items():
                response.headers[name] = value
            return response
        if url.path not in WEBSOCKET_PATHS:
            return connection.respond(HTTPStatus.NOT_FOUND, f"no websocket at {url.path}: see /v1/stream\n")
        bad_query = (deepgram_listen.refusal(url.path, url.query) or openai_realtime.refusal(url.path, url.query)
                     or bad_query_source(url.path, url.query))  # fmt: skip
        if bad_query is not None:
            response = connection.respond(*bad_query)
            response.headers["Content-Type"] = "application/json"
            return response
        if self._server is not None and len(self._server.connections) > self.config.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        return None

    # --- websockets --------------------------------------------------------------------------

    async def _websocket(self, ws: ServerConnection) -> None:
        url = urlsplit(ws.request.path)
        if url.path == "/v1/stream":
            await self._stream_client(ws)
        elif url.path == openai_realtime.PATH:
            await openai_realtime.serve(self, ws)
        elif url.path == deepgram_listen.PATH:
            await deepgram_listen.serve(self, ws)
        else:
            await self._viewer(ws, parse_qs(url.query).get("source", [""])[0])

    async def _stream_client(self, ws: ServerConnection) -> None:
        """``/v1/stream``: a client that sends audio and receives its own transcript, in a new
        session or, with ``resume`` in its start message, in one whose client dropped."""
        outbox = Outbox(self.config.max_queue)
        sender = self._sender(ws, outbox)
        try:
            start = parse_start(await asyncio.wait_for(ws.recv(), self.config.start_timeout_s))
            start = with_query_source(start, urlsplit(ws.request.path).query)
            if start.resume is not None:
                source, waiter = self.detached.resume(start, self.stopping)
            else:
                source, waiter = self.open_source(start.source, "websocket"), None
        except TimeoutError:
            err = ProtocolError("bad_start", f"no start message within {self.config.start_timeout_s:g} s", True)
            return await self._refuse(ws, outbox, sender, err, CloseCode.POLICY_VIOLATION)
        except ProtocolError as err:
            self.metrics.errors.labels(err.code).inc()
            return await self._refuse(ws, outbox, sender, err, err.close_code)
        except ConnectionClosed:
            outbox.close()
            return
        source.owner = outbox
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        read = self._read_websocket(ws, source, start.audio)
        if waiter is None:
            outbox.put(source.ready_message)
            session = asyncio.create_task(self._websocket_session(source, read, done))
            self._sessions.add(session)
            session.add_done_callback(self._sessions.discard)
        else:
            assert start.resume is not None
            log.info("source %s: session %s resumed after seq %d", source.id, source.session, start.resume.seq)
            outbox.put_backlog([source.ready_message_resumed, *source.finals_after(start.resume.seq)])
            waiter.set_result((read, done))
        fatal = await done
        outbox.close()
        await sender
        if fatal is not None:
            await ws.close(fatal.close_code, _reason(fatal))
        else:
            await ws.close(CloseCode.GOING_AWAY if self.stopping else CloseCode.NORMAL_CLOSURE)

    def open_source(self, source_id: str | None, kind: str) -> Source:
        """A new live source (or a ``too_many_streams`` / ``draining`` error), for which the oldest
        detached session makes room if the sessions would outnumber ``max_streams``."""
        if self.draining:
            raise ProtocolError("draining", "this node is draining: connect again and the proxy picks another",
                                fatal=True, close_code=TRY_AGAIN_LATER)  # fmt: skip
        source = self.hub.open(source_id, kind)
        self.detached.make_room(self.hub.live_count)
        return source

    async def _websocket_session(self, source: Source, read, done: asyncio.Future) -> None:
        """A websocket source's life across its connections. ``done`` resolves when the current
        connection's part is over: at once when it dropped (the session then waits for a
        resume), else once the session is finalised, with the fatal error that ended it, if any."""
        result = None
        self.scheduler.add(source)
        try:
            while True:
                result = await self._ingest(source, read)
                if result is not _DROPPED or self.config.resume_s <= 0 or self.stopping:
                    break
                # The client went away without "stop": its last utterance is final now, and the
                # session waits for it to come back.
                source.owner = None
                source.detached = True
                source.emit(source.stream.finish())
                self.scheduler.wake()
                done.set_result(None)
                waiter = self.detached.detach(source, self.hub.live_count)
                await asyncio.wait({waiter}, timeout=self.config.resume_s)
                self.detached.forget(source)
                resumed = waiter.done() and not waiter.cancelled() and waiter.result() is not None
                if not resumed:
                    if self.stopping:
                        why = "the daemon is stopping"
                    elif waiter.done():
                        why = "its slot went to a new stream (max_streams / max_detached)"
                    else:
                        why = f"not resumed within {self.config.resume_s:g} s"
                    log.info("source %s: detached session finalised: %s", source.id, why)
                    break
                read, done = waiter.result()
        finally:
            await self._finalise(source)
            if not done.done():
                done.set_result(result if isinstance(result, ProtocolError) else None)

    async def _read_websocket(self, ws: ServerConnection, source: Source, fmt: AudioFormat) -> object:
        """Feed the client's audio to ``source`` until ``stop`` (``None``), a fatal error (that
        error) or the connection drops (``_DROPPED``)."""
        decoder = AudioDecoder(fmt, self.config.max_frame_bytes)
        dropped = False
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    try:
                        if parse_control(frame) == "stop":
                            break
                    except ProtocolError as err:
                        self._client_error(source, err)
                    continue
                try:
                    samples, err = decoder.decode(frame)
                except ProtocolError as fatal:
                    self._client_error(source, fatal)
                    return fatal
                if err is not None:
                    self._client_error(source, err)
                await self.feed(source, samples)
        except ConnectionClosed as closed:
            if closed.sent is not None and closed.sent.code == CloseCode.MESSAGE_TOO_BIG:
                # websockets refused a frame over its own limit: the client broke the protocol.
                log.info(
                    "source %s: a frame over %d bytes; the stream ends", source.id, 2 * self.config.max_frame_bytes
                )
                await self.feed(source, decoder.flush())
                return ProtocolError(
                    "frame_too_large", "a frame over the websocket size limit", True, CloseCode.MESSAGE_TOO_BIG
                )
            log.info("source %s: client went away mid-stream", source.id)
            dropped = True
        await self.feed(source, decoder.flush())
        return _DROPPED if dropped else None

    async def _refuse(self, ws, outbox: Outbox, sender: asyncio.Task, err: ProtocolError, code: int) -> None:
        outbox.put(error_message(err))
        outbox.close()
        await sender
        await ws.close(code, _reason(err))

    def _client_error(self, source: Source, err: ProtocolError) -> None:
        self.metrics.errors.labels(err.code).inc()
        log.info("source %s: %s: %s", source.id, err.code, err)
        source.error(err)

    async def _viewer(self, ws: ServerConnection, source_id: str) -> None:
        """``/v1/captions?source=ID``: receives one source's messages, across its sessions."""
        outbox = Outbox(self.config.max_queue)
        sender = self._sender(ws, outbox)
        if not SOURCE_ID.match(source_id):
            err = ProtocolError(
                "bad_request", "use /v1/captions?source=ID with a source id", True, CloseCode.POLICY_VIOLATION
            )
            return await self._refuse(ws, outbox, sender, err, CloseCode.POLICY_VIOLATION)
        self._viewers[outbox] = sender
        self.hub.watch(source_id, outbox)
        try:
            async for _ in ws:
                err = ProtocolError("read_only", "captions viewers only receive; send audio to /v1/stream")
                outbox.put(error_message(err))
        except ConnectionClosed:
            pass
        finally:
            self.hub.unwatch(source_id, outbox)
            self._viewers.pop(outbox, None)
            outbox.close()
            await sender

    def _sender(self, ws: ServerConnection, outbox: Outbox) -> asyncio.Task:
        transport = WebsocketTransport(ws, self.config.slow_client_grace_s)
        return start_sender(outbox, transport, self.metrics.slow_clients.inc)

    # --- sources -----------------------------------------------------------------------------

    async def run_source(self, source: Source, read) -> ProtocolError | None:
        """Run ``read`` (the ingest) until it ends, the client goes or the daemon stops; then
        finalise: the last finals and ``end`` are queued to every receiver before this returns."""
        self.scheduler.add(source)
        result = None
        try:
            result = await self._ingest(source, read)
        finally:
            await self._finalise(source)
        return result if isinstance(result, ProtocolError) else None

    async def _ingest(self, source: Source, read) -> object:
        """Run one ingest coroutine to its end (cancelled on shutdown); what it returned."""
        reader = asyncio.ensure_future(read)
        self._readers[source] = reader
        try:
            await asyncio.wait({reader})
        finally:
            if self._readers.get(source) is reader:
                del self._readers[source]
        if reader.cancelled():
            return None
        if reader.exception() is not None:
            log.error("source %s: ingest failed", source.id, exc_info=reader.exception())
            source.publish(ProtocolError("internal_error", f"ingest failed: {reader.exception()}").message())
            return None
        return reader.result()

    async def _finalise(self, source: Source) -> None:
        """The last finals and ``end`` to every receiver; the source id is free again."""
        rejected = source.stream.vad_rejected
        source.finish()
        self.metrics.vad_rejected.inc(source.stream.vad_rejected - rejected)
        self.scheduler.wake()
        while not source.stream.idle:
            await source.wait_progress()
        self.hub.close(source)
        self.scheduler.remove(source)

    async def feed(self, source: Source, samples: np.ndarray) -> None:
        """``samples`` (16 kHz mono float32) into ``source``; waits while its window is full (the
        engine is behind), so that a protocol's reader stops reading and pushes back on its client."""
        while source.stream.buffered > self.config.max_buffer_s:
            await source.wait_progress()  # the engine is behind: stop reading, push back
        rejected = source.stream.vad_rejected
        self.scheduler.feed(source, samples)
        if source.stream.vad_rejected > rejected:
            self.metrics.vad_rejected.inc(source.stream.vad_rejected - rejected)
        self.metrics.audio_seconds.labels(source.kind).inc(len(samples) / SAMPLE_RATE)

    async def serve_live(
        self,
        kind: str,
        source_id: str | None,
        transport: Transport,
        render: Callable[[dict], list],
        read: Callable[[Source, Outbox], Awaitable[object]],
    ) -> ProtocolError | None:
        """One session of a client of another protocol (an adapter module's shell calls this):
        a source of ``kind`` opened, its messages rendered by ``render`` (which sees ``ready``
        first, or the error that refused the stream), ``read(source, outbox)`` run as its ingest
        until the client stops, then the source finalised. Returns the fatal error, if any."""
        outbox = Outbox(self.config.max_queue)
        sender = start_sender(outbox, RenderingTransport(transport, render), self.metrics.slow_clients.inc)
        try:
            source = self.open_source(source_id, kind)
        except ProtocolError as err:
            self.metrics.errors.labels(err.code).inc()
            outbox.put(error_message(err))
            outbox.close()
            await sender
            return err
        source.owner = outbox
        outbox.put(source.ready_message)
        fatal = await self.run_source(source, read(source, outbox))
        outbox.close()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        return fatal

    async def cut(self, source: Source) -> bool:
        """End ``source``'s utterance now (a Realtime ``commit``, a Deepgram ``Finalize``) and wait
        until its last finals are queued; the stream goes on after. Whether speech was open."""
        events = source.stream.finish()
        source.emit(events)
        self.scheduler.wake()
        while not source.stream.idle:
            await source.wait_progress()
        return any(isinstance(e, VadChange) for e in events)

    def clear(self, source: Source) -> None:
        """Drop what ``source`` has not committed yet (a Realtime ``input_audio_buffer.clear``)."""
        source.stream.clear()
        self.scheduler.wake()

    def play(self, source_id: str, kind: str, chunks: AsyncIterator[np.ndarray]) -> asyncio.Task:
        """Run a server-side source (a file, the microphone) until its audio ends."""
        source = self.open_source(source_id, kind)

        async def read() -> None:
            async for samples in chunks:
                await self.feed(source, samples)

        task = asyncio.create_task(self.run_source(source, read()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def file_chunks(audio: np.ndarray, realtime: bool) -> AsyncIterator[np.ndarray]:
    """A recording, 100 ms at a time: at the pace it was spoken, or as fast as the engine takes it."""
    started = time.monotonic()
    for i in range(0, len(audio), CHUNK):
        if realtime:
            delay = started + (i + CHUNK) / SAMPLE_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)
        yield audio[i : i + CHUNK]


def source_id_for(path: Path) -> str:
    """A file's source id: its stem, made to fit the id rules."""
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in path.stem).lstrip("._-:")
    return stem[:64] or "file"


def _select_subprotocol(connection: ServerConnection, offered: Sequence[str]) -> str | None:
    """The subprotocol the client's own API names, so that a browser sees one it offered: OpenAI's
    ``realtime`` (beside the key it carries), Deepgram's ``token`` (before the key); else none."""
    for name in ("realtime", "token"):
        if name in offered:
            return name
    return None


def _reason(err: ProtocolError) -> str:
    """A close reason: at most 123 bytes of UTF-8 (RFC 6455), whole characters."""
    return str(err).encode("utf-8")[:120].decode("utf-8", "ignore")


_DROPPED = object()  # what a websocket ingest returns when its client went away without "stop"


def _address(sock) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
