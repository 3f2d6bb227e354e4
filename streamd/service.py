"""``streamd serve``: load the model, start the daemon and its sources, stop cleanly on a signal.

Settings come from the command line, then a TOML file (``--config``), then the defaults. Keys
in the file are the long option names with ``_`` for ``-`` (``tcp_port = 8766``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tomllib
from dataclasses import fields, replace
from pathlib import Path

from .notify import Notifier
from .server import Daemon, ServerConfig, file_chunks, source_id_for
from .stream import StreamConfig
from .vad import VadConfig

__all__ = ["add_serve_args", "serve_main"]

log = logging.getLogger("streamd")

# option: (type, default, help)
OPTIONS: dict[str, tuple[type, object, str]] = {
    "host": (str, "127.0.0.1", "address to listen on"),
    "port": (int, 8765, "websocket + HTTP port (0: any free port)"),
    "tcp_port": (int, None, "also take raw s16le 16 kHz mono audio on this TCP port, JSON lines out"),
    "model": (str, None, "CTranslate2 or Hugging Face Whisper folder (default: bundled tiny.en)"),
    "backend": (str, "auto", "accelerator: auto or cpu"),
    "file": (str, None, "stream this recording as a source (its id is the file's stem)"),
    "realtime": (bool, False, "play --file at the pace it was spoken"),
    "mic": (str, None, "capture this input device as source 'mic' ('default' for the default device)"),
    "vad_aggressiveness": (int, 2, "webrtcvad aggressiveness 0 (lenient) to 3 (strict)"),
    "update_s": (float, 0.5, "new speech before a window is decoded again (latency vs CPU)"),
    "workers": (int, 1, "engine threads: streams decoded side by side (one per core for many streams)"),
    "threads": (int, 1, "BLAS threads for the engine: 1 costs the least CPU per stream, more cut latency"),
    "max_frame_bytes": (int, 1 << 20, "largest audio frame accepted"),
    "max_queue": (int, 256, "messages waiting for one client before it is cut off"),
    "max_connections": (int, 64, "websocket connections at once"),
    "max_streams": (int, 16, "audio sources at once"),
    "log_level": (str, "info", "debug, info, warning or error"),
}


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML file of settings (keys: the option names with _)")
    for name, (kind, default, text) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        shown = f" (default: {default})" if default not in (None, False) else ""
        if kind is bool:
            p.add_argument(flag, action="store_const", const=True, default=None, help=text)
        elif name == "mic":
            p.add_argument(flag, nargs="?", const="default", default=None, metavar="DEVICE", help=text)
        else:
            p.add_argument(flag, type=kind, default=None, metavar=name.upper(), help=text + shown)


class ConfigError(Exception):
    pass


def settings(args: argparse.Namespace) -> dict[str, object]:
    """CLI over the config file over the defaults; a bad key or value is a one-line error."""
    values = {name: default for name, (_, default, _) in OPTIONS.items()}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{args.config}: {e}") from None
        for key, value in data.items():
            if key not in OPTIONS:
                raise ConfigError(f"{args.config}: unknown key {key!r}")
            kind = OPTIONS[key][0]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(f"{args.config}: {key} must be {kind.__name__}, got {value!r}")
            values[key] = value
    for name in OPTIONS:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if values["vad_aggressiveness"] not in (0, 1, 2, 3):
        raise ConfigError(f"vad_aggressiveness must be 0..3, got {values['vad_aggressiveness']}")
    if int(values["workers"]) < 1:
        raise ConfigError(f"workers must be at least 1, got {values['workers']}")
    if int(values["threads"]) < 1:
        raise ConfigError(f"threads must be at least 1, got {values['threads']}")
    if not 0.1 <= float(values["update_s"]) <= 5.0:
        raise ConfigError(f"update_s must be from 0.1 to 5, got {values['update_s']}")
    return values


def server_config(values: dict[str, object]) -> ServerConfig:
    stream = replace(StreamConfig(), update_s=float(values["update_s"]),
                     vad=VadConfig(aggressiveness=int(values["vad_aggressiveness"])))  # fmt: skip
    known = {f.name for f in fields(ServerConfig)}
    return ServerConfig(**{k: v for k, v in values.items() if k in known}, stream=stream)


def serve_main(args: argparse.Namespace) -> int:
    try:
        values = settings(args)
    except ConfigError as e:
        print(f"streamd: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=str(values["log_level"]).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if log.getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    from npu.engine import Engine
    from npu.weights import ModelError

    _limit_blas_threads(int(values["threads"]))
    try:
        engine = Engine.load(values["model"], backend=str(values["backend"]))
    except ModelError as e:
        print(f"streamd: {e}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_serve(engine, values))
    except OSError as e:  # the port is taken, the address does not exist, ...
        print(f"streamd: cannot listen: {e}", file=sys.stderr)
        return 1


def _limit_blas_threads(threads: int) -> None:
    """Live decoding is many small products: a second OpenBLAS thread mostly spins there.
    Measured on the 2-core build machine (BENCHMARKS.md): 2 threads 0.80 CPU-s per audio second,
    1 thread 0.46, for 0.06 s more final latency."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)


async def _watchdog(daemon: Daemon, notifier: Notifier) -> None:
    """Ping systemd's watchdog from the event loop itself: if the loop stalls, the pings stop
    and systemd restarts the service. Each ping carries a one-line status."""
    interval = (notifier.watchdog_s or 60.0) / 2
    while True:
        health = daemon.health()
        status = (
            f"STATUS={len(health['streams'])} stream(s), {health['viewers']} viewer(s), lag {health['lag_s']:.1f} s"
        )
        notifier.notify(*(["WATCHDOG=1"] if notifier.watchdog_s else []), status)
        await asyncio.sleep(min(interval, 5.0))


async def _serve(engine, values: dict[str, object]) -> int:
    notifier = Notifier()
    daemon = Daemon(engine, server_config(values))
    await daemon.start()
    where = ", ".join(daemon.addresses)
    print(f"streamd: serving {engine.model_name} on {where}", file=sys.stderr, flush=True)
    notifier.notify("READY=1", f"STATUS=serving {engine.model_name} on {where}")
    pinger = asyncio.create_task(_watchdog(daemon, notifier)) if notifier.enabled else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    status = 0
    try:
        if values["file"]:
            from .audio import AudioError, load_audio

            path = Path(str(values["file"]))
            try:
                audio = await asyncio.to_thread(load_audio, path)
            except AudioError as e:
                print(f"streamd: {e}", file=sys.stderr)
                return 1
            daemon.play(source_id_for(path), "file", file_chunks(audio, bool(values["realtime"])))
        if values["mic"]:
            from .mic import MicError, capture

            device = None if values["mic"] == "default" else str(values["mic"])
            chunks = capture(device)
            try:
                first = await anext(chunks)  # opens the device: fail now, clearly
            except MicError as e:
                print(f"streamd: {e}", file=sys.stderr)
                return 1

            async def with_first():
                yield first
                async for chunk in chunks:
                    yield chunk

            daemon.play("mic", "mic", with_first())
        await stop.wait()
        log.info("signal received")
    finally:
        notifier.notify("STOPPING=1", f"STATUS=finalising {len(daemon.hub.sources)} stream(s)")
        await daemon.shutdown()
        if pinger is not None:
            pinger.cancel()
        notifier.close()
    return status
