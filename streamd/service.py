"""``streamd serve``: load the model, start the daemon and its sources, stop cleanly on a signal.

Settings come from the command line, then ``STREAMD_*`` environment variables
(``STREAMD_TCP_PORT=8766``), then a TOML file (``--config`` or ``$STREAMD_CONFIG``), then the
defaults. Keys in the file are the long option names with ``_`` for ``-`` (``tcp_port = 8766``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import tomllib
from dataclasses import fields, replace
from pathlib import Path

from .auth import is_loopback_address
from .notify import Notifier
from .server import Daemon, ServerConfig, file_chunks, source_id_for
from .stream import StreamConfig
from .vad import VadConfig

__all__ = ["add_serve_args", "serve_main"]

log = logging.getLogger("streamd")

# option: (type, default, help). Defaults and the checks of a value's range live with the
# settings they configure (ServerConfig, StreamConfig, VadConfig); this table adds the type and
# the help, and the options that configure nothing there (backend, model, threads, ...).
OPTIONS: dict[str, tuple[type, object, str]] = {
    "host": (str, ServerConfig.host, "address to listen on"),
    "port": (int, ServerConfig.port, "websocket + HTTP port (0: any free port)"),
    "tcp_port": (int, None, "also take raw s16le 16 kHz mono audio on this TCP port, JSON lines out"),
    "wyoming_port": (int, None, "also serve Wyoming speech-to-text (Home Assistant) on this TCP port, e.g. 10300"),
    "wyoming_host": (str, ServerConfig.wyoming_host, "address of the Wyoming port (off loopback: set wyoming_allow)"),
    "wyoming_allow": (
        str,
        ServerConfig.wyoming_allow,
        "comma-separated addresses or networks that may use the Wyoming port besides loopback",
    ),
    "wyoming_zeroconf": (bool, False, "announce the Wyoming port over mDNS for Home Assistant (pip install zeroconf)"),
    "wyoming_live_transcript": (
        bool,
        False,
        "Wyoming's transcript: the live words at the stop, at once (default: the command decoded again, better)",
    ),
    "model": (str, None, "CTranslate2 or Hugging Face Whisper folder (default: bundled tiny.en)"),
    "backend": (str, "auto", "accelerator: auto, cpu, xdna, xdna-all, golden or cuda"),
    "cuda_device": (
        str,
        "cuda",
        "torch device of --backend cuda: cuda, cuda:N, or cpu (torch's CPU device, for tests)",
    ),
    "file": (str, None, "stream this recording as a source (its id is the file's stem)"),
    "realtime": (bool, False, "play --file at the pace it was spoken"),
    "mic": (str, None, "capture this input device as source 'mic' ('default' for the default device)"),
    "vad_aggressiveness": (int, VadConfig.aggressiveness, "webrtcvad aggressiveness 0 (lenient) to 3 (strict)"),
    "speech_detector": (
        str,
        VadConfig.detector,
        "neural VAD confirming what webrtcvad hears: silero, or off (webrtcvad alone)",
    ),
    "speech_threshold": (float, VadConfig.threshold, "Silero probability at which speech starts (higher: stricter)"),
    "speech_neg_threshold": (
        float,
        VadConfig.neg_threshold,
        "Silero probability under which speech stops (default: threshold - 0.15)",
    ),
    "update_s": (float, StreamConfig.update_s, "new speech before a window is decoded again (latency vs CPU)"),
    "workers": (
        int,
        ServerConfig.workers,
        "engine threads: streams decoded side by side (one per core for many streams)",
    ),
    "threads": (int, 1, "BLAS threads for the engine: 1 costs the least CPU per stream, more cut latency"),
    "max_batch": (
        int,
        ServerConfig.max_batch,
        "streams' windows decoded as one batch on a backend that batches (cuda); 1: one at a time",
    ),
    "max_frame_bytes": (int, ServerConfig.max_frame_bytes, "largest audio frame accepted"),
    "max_queue": (int, ServerConfig.max_queue, "messages waiting for one client before it is cut off"),
    "max_connections": (
        int,
        ServerConfig.max_connections,
        "connections at once, of each kind: HTTP, websocket, Wyoming (past it: 503, or a Wyoming error)",
    ),
    "max_streams": (int, ServerConfig.max_streams, "audio sources at once"),
    "log_level": (str, "info", "debug, info, warning or error"),
    "ping_interval_s": (
        float,
        ServerConfig.ping_interval_s,
        "websocket keepalive ping; a client silent for twice this is dropped",
    ),
    "resume_s": (
        float,
        ServerConfig.resume_s,
        "a dropped stream client may resume its session within this many seconds (0: off)",
    ),
    "drain_s": (
        float,
        ServerConfig.drain_s,
        "on SIGTERM, let live streams finish for up to this long first, taking no new ones (behind a proxy)",
    ),
    "max_detached": (
        int,
        ServerConfig.max_detached,
        "sessions waiting for a resume at once; they yield their slot to new streams",
    ),
    "max_upload_bytes": (
        int,
        ServerConfig.max_upload_bytes,
        "largest HTTP request body: a file posted to /v1/audio/transcriptions (413 past it)",
    ),
    "max_file_requests": (
        int,
        ServerConfig.max_file_requests,
        "file transcriptions waiting or running at once (429 with Retry-After past it)",
    ),
    "state_dir": (
        str,
        None,
        "keep every final here (transcripts.db) across restarts; default $STATE_DIRECTORY "
        "(systemd), else ~/.local/state/streamd",
    ),
    "retention_days": (
        float,
        ServerConfig.retention_days,
        "delete stored sessions older than this (0: keep no transcripts)",
    ),
    "token_file": (str, None, "file holding the token clients must send (required off loopback)"),
    "allowed_origins": (str, "", "comma-separated browser origins allowed besides the page's own"),
    "tls_cert": (str, None, "PEM certificate: serve https/wss"),
    "tls_key": (str, None, "PEM private key for --tls-cert"),
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


def _coerce(key: str, value: object, where: str) -> object:
    """A value from TOML (typed) or the environment (text) as the option's type."""
    kind = OPTIONS[key][0]
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                return text.lower() in ("1", "true", "yes", "on")
            return kind(text)
        except ValueError:
            raise ConfigError(f"{where}: {key} must be {kind.__name__}, got {value!r}") from None
    listed = key in ("allowed_origins", "wyoming_allow") and isinstance(value, list)
    if listed and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
    return value


def settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, object]:
    """Command line over ``STREAMD_*`` environment over the config file over the defaults;
    a bad key or value is a one-line error naming it."""
    env = os.environ if environ is None else environ
    values = {name: default for name, (_, default, _) in OPTIONS.items()}
    config = getattr(args, "config", None) or env.get("STREAMD_CONFIG")
    if config:
        try:
            with open(config, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{config}: {e}") from None
        for key, value in data.items():
            if key not in OPTIONS:
                raise ConfigError(f"{config}: unknown key {key!r}")
            values[key] = _coerce(key, value, config)
    for name in OPTIONS:
        variable = "STREAMD_" + name.upper()
        if variable in env:
            values[name] = _coerce(name, env[variable], variable)
    for name in OPTIONS:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    _check(values)
    return values


def _check(values: dict[str, object]) -> None:
    from whisper_engine.backends import BACKENDS

    if values["backend"] not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {values['backend']!r}")
    if int(values["threads"]) < 1:
        raise ConfigError(f"threads must be at least 1, got {values['threads']}")
    if str(values["log_level"]).lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be debug, info, warning or error, got {values['log_level']!r}")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("tls_cert and tls_key go together: set both or neither")
    if values["token_file"]:
        try:
            token = token_path(values["token_file"]).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"token_file: cannot read {values['token_file']}: {e.strerror}") from None
        if len(token) < 16:
            raise ConfigError(f"token_file: {values['token_file']} holds a token shorter than 16 characters")
    elif not is_loopback_address(str(values["host"])):
        raise ConfigError(
            f"host {values['host']!r} is not loopback: set token_file (clients must send the token) to listen there"
        )
    if values["wyoming_zeroconf"]:
        try:
            import zeroconf  # noqa: F401
        except ImportError:
            raise ConfigError("wyoming_zeroconf needs the zeroconf package: pip install 'streamd[zeroconf]'") from None
    try:
        server_config(values)  # each setting's own range checks
    except ValueError as e:
        raise ConfigError(str(e)) from None


def token_path(value: object) -> Path:
    """A relative token_file is looked up in systemd's $CREDENTIALS_DIRECTORY (LoadCredential=)."""
    path = Path(str(value))
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(credentials) / path if credentials and not path.is_absolute() else path


def render(values: dict[str, object]) -> str:
    """The effective settings as TOML (what ``streamd config check`` prints)."""
    lines = []
    for key, value in values.items():
        if value is None:
            lines.append(f"# {key} is not set")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")
    return "\n".join(lines)


def _settings_or_say_why(config: str | None) -> dict[str, object] | None:
    """The settings of ``config`` (and the environment), or ``None`` once the error is printed."""
    try:
        return settings(argparse.Namespace(config=config))
    except ConfigError as e:
        print(f"streamd: {e}", file=sys.stderr)
        return None


def check_main(args: argparse.Namespace) -> int:
    """``streamd config check [FILE]``: validate, print the effective settings; exit 2 if invalid."""
    values = _settings_or_say_why(args.file)
    if values is None:
        return 2
    print(render(values))
    return 0


def drain_main(args: argparse.Namespace) -> int:
    """``streamd drain``: ask the daemon on this machine to drain (``POST /v1/drain``)."""
    import urllib.error
    import urllib.request

    values = _settings_or_say_why(args.config)
    if values is None:
        return 2
    host = str(values["host"])
    host = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else host
    scheme = "https" if values["tls_cert"] else "http"
    url = f"{scheme}://{host}:{values['port']}/v1/drain"
    if args.timeout_s is not None:
        url += f"?timeout_s={args.timeout_s:g}"
    request = urllib.request.Request(url, method="POST")
    if values["token_file"]:
        token = token_path(values["token_file"]).read_text(encoding="utf-8").strip()
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(f"streamd: {url}: {json.load(response)['status']}")
            return 0
    except urllib.error.HTTPError as e:
        print(f"streamd: {url}: {e.code} {e.read().decode(errors='replace').strip()}", file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"streamd: {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
    return 1


def vad_config(values: dict[str, object]) -> VadConfig:
    """The VAD settings of every source (and of ``streamd transcribe``)."""
    return VadConfig(
        aggressiveness=int(values["vad_aggressiveness"]),
        detector=str(values["speech_detector"]),
        threshold=float(values["speech_threshold"]),
        neg_threshold=None if values["speech_neg_threshold"] is None else float(values["speech_neg_threshold"]),
    )


def server_config(values: dict[str, object]) -> ServerConfig:
    stream = replace(StreamConfig(), update_s=float(values["update_s"]), vad=vad_config(values))
    known = {f.name for f in fields(ServerConfig)} - {"token", "allowed_origins", "stream", "state_dir"}
    token = token_path(values["token_file"]).read_text(encoding="utf-8").strip() if values["token_file"] else None
    origins = tuple(o.strip().rstrip("/") for o in str(values["allowed_origins"] or "").split(",") if o.strip())
    return ServerConfig(
        **{k: v for k, v in values.items() if k in known},
        stream=stream,
        token=token,
        allowed_origins=origins,
        state_dir=str(values["state_dir"] or default_state_dir()),
    )


def default_state_dir() -> Path:
    """systemd's ``StateDirectory=`` (``$STATE_DIRECTORY``), else the XDG state home."""
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "streamd"


GPU_SWITCH_INTERVAL_S = 0.0005  # the interpreter's thread switch interval next to a batching (GPU) engine


def serve_main(args: argparse.Namespace) -> int:
    try:
        values = settings(args)
    except ConfigError as e:
        print(f"streamd: {e}", file=sys.stderr)
        return 2
    _configure_logging(str(values["log_level"]))
    if log.getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    from whisper_engine.backends import BackendUnavailable
    from whisper_engine.engine import Engine
    from whisper_engine.weights import ModelError

    _limit_blas_threads(int(values["threads"]))
    try:
        engine = Engine.load(values["model"], backend=str(values["backend"]), device=str(values["cuda_device"]))
    except (ModelError, BackendUnavailable) as e:
        print(f"streamd: {e}", file=sys.stderr)
        return 1
    _limit_torch_threads(int(values["threads"]))
    if engine.backend.max_batch > 1:
        # Every tensor call of the engine thread releases the GIL; with hundreds of streams the
        # event loop then holds it for up to the switch interval (5 ms) before the engine gets it
        # back, thousands of times per batch. A shorter slice bounds that wait.
        sys.setswitchinterval(GPU_SWITCH_INTERVAL_S)
    try:
        return asyncio.run(_serve(engine, values))
    except PermissionError as e:  # a socket passed in by systemd that the settings do not allow
        print(f"streamd: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken, the address does not exist, ...
        print(f"streamd: cannot listen: {e}", file=sys.stderr)
        return 1


async def _first(*waits) -> None:
    """Wait for the first of ``waits`` to finish; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """Under systemd (``$JOURNAL_STREAM``): a ``<priority>`` prefix journald turns into the
    record's level, and no timestamp (journald adds its own)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", "\n    ")
        return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout if os.environ.get("JOURNAL_STREAM") else sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _limit_blas_threads(threads: int) -> None:
    """Live decoding is many small products: a second OpenBLAS thread mostly spins there.
    Measured on the 2-core build machine (BENCHMARKS.md): 2 threads 0.80 CPU-s per audio second,
    1 thread 0.46, for 0.06 s more final latency."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)


def _limit_torch_threads(threads: int) -> None:
    """The cuda backend on torch's CPU device: torch keeps its own thread count (threadpoolctl
    sets only the calling thread's), and new threads (the engine's) take it from here."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def listen_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """Sockets systemd passed in (``streamd.socket``; sd_listen_fds(3)): ``$LISTEN_FDS`` of them
    from fd 3, if ``$LISTEN_PID`` is us. The variables are removed so children do not see them."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(env.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    sockets = [socket.socket(fileno=3 + i) for i in range(count)]
    for sock in sockets:
        sock.setblocking(False)
    return sockets


async def _watchdog(daemon: Daemon, notifier: Notifier) -> None:
    """Ping systemd's watchdog from the event loop itself: if the loop stalls, the pings stop
    and systemd restarts the service. Each ping carries a one-line status."""
    interval = (notifier.watchdog_s or 60.0) / 2
    while True:
        health = daemon.status.health()
        status = (
            f"STATUS={len(health['streams'])} stream(s), {health['viewers']} viewer(s), lag {health['lag_s']:.1f} s"
        )
        notifier.notify(*(["WATCHDOG=1"] if notifier.watchdog_s else []), status)
        await asyncio.sleep(min(interval, 5.0))


async def _serve(engine, values: dict[str, object]) -> int:
    notifier = Notifier()
    daemon = Daemon(engine, server_config(values))
    await daemon.start(listen_sockets())
    pinger = None
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
        # Ready only now: the model is loaded, the ports are bound and the sources are open.
        where = ", ".join(daemon.addresses)
        print(f"streamd: serving {engine.model_name} on {where}", file=sys.stderr, flush=True)
        notifier.notify("READY=1", f"STATUS=serving {engine.model_name} on {where}")
        pinger = asyncio.create_task(_watchdog(daemon, notifier)) if notifier.enabled else None
        await _first(stop.wait(), daemon.drain_requested.wait())
        drain_s = daemon.drain_timeout_s if daemon.drain_requested.is_set() else float(values["drain_s"])
        log.info("drain requested" if daemon.drain_requested.is_set() else "signal received")
        if drain_s > 0:
            notifier.notify(f"STATUS=draining {len(daemon.hub.sources)} stream(s), for up to {drain_s:g} s")
            now = asyncio.Event()  # a second signal: stop draining, stop now
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, now.set)
            await _first(daemon.drain(drain_s), now.wait())
    finally:
        notifier.notify("STOPPING=1", f"STATUS=finalising {len(daemon.hub.sources)} stream(s)")
        await daemon.shutdown()
        if pinger is not None:
            pinger.cancel()
        notifier.close()
    return status
