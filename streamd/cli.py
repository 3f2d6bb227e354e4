"""The ``streamd`` command line: ``streamd transcribe FILE...`` and ``streamd serve``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from whisper_engine.backends import BACKENDS

from .vad import DETECTORS, VadConfig

__all__ = ["main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", metavar="PATH", help="CTranslate2 or Hugging Face Whisper folder (default: bundled tiny.en)"
    )
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="accelerator (default: auto)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamd", description="Real-time Whisper transcription daemon and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="transcribe audio files offline", description="Transcribe audio files.")
    t.add_argument("files", nargs="+", metavar="FILE", help="audio files: WAV, FLAC, OGG, MP3, M4A, WebM...")
    t.add_argument("--format", default="text", choices=["text", "jsonl", "srt", "vtt"], help="output format")
    t.add_argument("--beam-size", type=int, default=1, metavar="N", help="beam width; 1 is greedy (default: 1)")
    t.add_argument("--output-dir", metavar="DIR", help="write FILE.<format> there instead of printing to stdout")
    t.add_argument("--no-word-timestamps", action="store_true", help="skip word alignment (faster)")
    t.add_argument("--no-fallback", action="store_true", help="no temperature fallback on looping or unlikely text")
    t.add_argument("--pad-to-30s", action="store_true", help="encode every window padded to 30 s, as Whisper does")
    t.add_argument(
        "--no-vad", action="store_true", help="decode the whole file, not only the speech the VAD finds (music, noise)"
    )
    t.add_argument("--vad", action="store_true", help=argparse.SUPPRESS)  # the default since the neural VAD
    t.add_argument(
        "--speech-detector",
        default=VadConfig.detector,
        choices=DETECTORS,
        help=f"VAD second stage (default: {VadConfig.detector})",
    )
    t.add_argument(
        "--speech-threshold",
        type=float,
        default=VadConfig.threshold,
        metavar="P",
        help=f"Silero speech probability (default: {VadConfig.threshold})",
    )
    t.add_argument("--prompt", metavar="TEXT", help="initial prompt: names, spelling, style to condition on")
    t.add_argument("--no-condition", action="store_true", help="do not feed each window the previous text")
    _add_model_args(t)
    from .service import add_serve_args

    s = sub.add_parser(
        "serve",
        help="run the live-captioning daemon (protocol v1 over websockets)",
        description="Serve live transcripts: ws /v1/stream, ws /v1/captions?source=ID, GET / /healthz /metrics.",
    )
    add_serve_args(s)
    d = sub.add_parser(
        "drain",
        help="tell the running daemon to finish its live streams, take no new ones, then stop",
        description="POST /v1/drain to the daemon the settings name (host, port, token_file): its /healthz "
        "answers 503 draining, so a proxy sends new sources elsewhere; it stops once its streams end.",
    )
    d.add_argument("--config", metavar="FILE", help="TOML file of settings (default: $STREAMD_CONFIG)")
    d.add_argument("--timeout-s", type=float, default=None, metavar="S", help="stop after this long anyway (300)")
    c = sub.add_parser("config", help="configuration tools", description="Configuration tools.")
    csub = c.add_subparsers(dest="action", required=True)
    check = csub.add_parser("check", help="validate settings and print the effective configuration")
    check.add_argument("file", nargs="?", help="TOML file (default: $STREAMD_CONFIG, else none)")
    return parser


class _Progress:
    """A one-line progress bar on stderr, shown only on a terminal and for long files."""

    MIN_SECONDS = 60.0

    def __init__(self, name: str, stream=sys.stderr) -> None:
        self.name = name
        self.stream = stream
        self.enabled = stream.isatty()
        self.shown = False

    def __call__(self, done: float, total: float) -> None:
        if not self.enabled or total < self.MIN_SECONDS:
            return
        width = 30
        filled = int(width * done / total) if total else width
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self.name[:30]:30s} [{bar}] {done:6.0f}/{total:.0f} s")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _transcribe(args: argparse.Namespace) -> int:
    from whisper_engine.engine import NO_FALLBACK, FallbackPolicy
    from whisper_engine.transcribe import TranscribeOptions

    from .audio import AudioError, load_audio
    from .files import transcribe_file
    from .formats import render
    from .vad import VadConfig

    if args.beam_size < 1:
        print("streamd: --beam-size must be at least 1", file=sys.stderr)
        return 2
    engine = _load_engine(args)
    if engine is None:
        return 1
    options = TranscribeOptions(
        beam_size=args.beam_size,
        word_timestamps=not args.no_word_timestamps,
        fallback=NO_FALLBACK if args.no_fallback else FallbackPolicy(),
        pad_to_30s=args.pad_to_30s,
        initial_prompt=args.prompt,
        condition_on_previous_text=not args.no_condition,
    )
    try:
        vad = VadConfig(detector=args.speech_detector, threshold=args.speech_threshold)
    except ValueError as e:
        print(f"streamd: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    status = 0
    for i, name in enumerate(args.files):
        try:
            audio = load_audio(name)
        except AudioError as e:
            print(f"streamd: {e}", file=sys.stderr)
            status = 1
            continue
        started = time.perf_counter()
        progress = _Progress(Path(name).name)
        try:
            result = transcribe_file(engine, audio, options, None if args.no_vad else vad, progress=progress)
        finally:
            progress.close()
        text = render(result, args.format, name, time.perf_counter() - started)
        if out_dir:
            ext = {"text": "txt", "jsonl": "json"}.get(args.format, args.format)
            (out_dir / f"{Path(name).stem}.{ext}").write_text(text + "\n", encoding="utf-8")
        elif args.format == "text" and len(args.files) > 1:
            print(f"{name}: {text}", flush=True)
        else:
            if args.format in ("srt", "vtt") and i > 0:
                print(flush=True)
            print(text, flush=True)
    return status


def _load_engine(args: argparse.Namespace):
    from whisper_engine.backends import BackendUnavailable
    from whisper_engine.engine import Engine
    from whisper_engine.weights import ModelError

    try:
        return Engine.load(args.model, backend=args.backend)
    except (ModelError, BackendUnavailable) as e:
        print(f"streamd: {e}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "transcribe":
            return _transcribe(args)
        if args.command == "drain":
            from .service import drain_main

            return drain_main(args)
        if args.command == "config":
            from .service import check_main

            return check_main(args)
        if args.command == "serve":
            from .service import serve_main

            return serve_main(args)
    except BrokenPipeError:
        # The reader went away (`streamd transcribe ... | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
