"""OpenAI's file transcription API on the daemon's engine: ``POST /v1/audio/transcriptions`` and
``GET /v1/models``, as the ``openai`` SDK and the tools built on it call them (only the base
URL changes; the daemon's token is the API key).

A request is a multipart form: ``file``, ``model``, ``language``, ``prompt``, ``temperature``,
``response_format`` (``json``, ``text``, ``srt``, ``vtt``, ``verbose_json``),
``timestamp_granularities[]`` and ``stream``. Reading the form, checking its fields and writing
the answer are plain functions here; the transcription itself runs on the daemon's
:class:`~streamd.files.FileQueue`. Errors have OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``, and its statuses. Where OpenAI's own rules are odd they are kept, since
clients are written against them: word timestamps only with ``verbose_json``, and
``verbose_json`` asked for words alone leaves segments out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus

from python_multipart.multipart import MultipartParser, parse_options_header

from whisper_engine.engine import FallbackPolicy
from whisper_engine.transcribe import Segment, TranscribeOptions, Transcript

from .audio import SAMPLE_RATE, AudioError, decode_audio
from .files import FileQueue, QueueFull
from .formats import to_srt, to_vtt
from .http import Request, Response

__all__ = ["FORMATS", "OpenAIError", "TranscriptionRequest", "models", "read_request", "render", "transcriptions"]

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
#: Model names a request may give: the loaded model's own, and the names clients send OpenAI.
ALIASES = ("whisper-1",)
LANGUAGES = {"en": "english"}  # what an English-only model answers ``verbose_json`` with


class OpenAIError(Exception):
    """A refused request, as OpenAI reports one."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def error(self) -> dict:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}

    def response(self) -> Response:
        return Response(int(self.status), _json({"error": self.error()}), "application/json", dict(self.headers))


@dataclass
class TranscriptionRequest:
    audio: bytes
    filename: str
    model: str
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    response_format: str = "json"
    granularities: tuple[str, ...] = ()
    stream: bool = False
    extra: dict[str, str] = field(default_factory=dict)  # fields this server does not use

    @property
    def words(self) -> bool:
        return "word" in self.granularities

    def options(self) -> TranscribeOptions:
        """What :func:`~streamd.files.transcribe_file` runs: ``streamd transcribe``'s defaults,
        the prompt, and OpenAI's temperature rule (0: start greedy and raise it when the text
        looks wrong; more: start there)."""
        fallback = FallbackPolicy()
        if self.temperature > 0:
            hotter = tuple(t for t in fallback.temperatures if t > self.temperature)
            fallback = FallbackPolicy(temperatures=(self.temperature, *hotter))
        return TranscribeOptions(initial_prompt=self.prompt or None, word_timestamps=self.words, fallback=fallback)


def parse_form(
    content_type: str, body: bytes, max_fields: int = 64
) -> tuple[dict[str, list[str]], dict[str, tuple[str, bytes]]]:
    """A ``multipart/form-data`` body's text fields (each name's values in order) and files
    (name → (file name, bytes))."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "the body must be multipart/form-data with a boundary", None)
    fields: dict[str, list[str]] = {}
    files: dict[str, tuple[str, bytes]] = {}
    part: dict = {}
    header_name = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        part["headers"][bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["data"].extend(data[start:end])

    def on_part_end() -> None:
        disposition, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            return
        if len(fields) + len(files) >= max_fields:
            raise OpenAIError(HTTPStatus.BAD_REQUEST, f"more than {max_fields} form fields")
        if b"filename" in options:
            files[name] = (options[b"filename"].decode("utf-8", "replace"), bytes(part["data"]))
        else:
            fields.setdefault(name, []).append(part["data"].decode("utf-8", "replace"))

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except OpenAIError:
        raise
    except Exception as exc:  # python-multipart's errors: a malformed body
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"the multipart body could not be read: {exc}") from None
    return fields, files


def read_request(
    fields: dict[str, list[str]], files: dict[str, tuple[str, bytes]], model_name: str
) -> TranscriptionRequest:
    """Check a form's fields as OpenAI does; raise :class:`OpenAIError` naming the bad one."""

    def one(name: str) -> str | None:
        values = fields.get(name)
        return values[-1] if values else None

    if "file" not in files:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "a file is required: send it as the form field 'file'", "file")
    filename, audio = files["file"]
    model = one("model")
    if not model:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "you must provide a model parameter", "model")
    if model not in (model_name, *ALIASES):
        raise OpenAIError(
            HTTPStatus.NOT_FOUND,
            f"the model {model!r} does not exist here: this daemon serves {model_name!r} "
            f"(also as {', '.join(ALIASES)})",
            "model",
            "model_not_found",
        )
    response_format = one("response_format") or "json"
    if response_format not in FORMATS:
        raise OpenAIError(
            HTTPStatus.BAD_REQUEST,
            f"response_format {response_format!r} is not one of {', '.join(FORMATS)}",
            "response_format",
            "invalid_value",
        )
    language = one("language") or None
    if language is not None and language.lower() not in LANGUAGES:
        raise OpenAIError(
            HTTPStatus.BAD_REQUEST,
            f"language {language!r} is not supported: {model_name} transcribes English only ('en')",
            "language",
            "unsupported_language",
        )
    temperature_text = one("temperature")
    try:
        temperature = float(temperature_text) if temperature_text not in (None, "") else 0.0
    except ValueError:
        temperature = -1.0
    if not 0.0 <= temperature <= 1.0:
        raise OpenAIError(
            HTTPStatus.BAD_REQUEST, f"temperature must be a number from 0 to 1, got {temperature_text!r}", "temperature"
        )
    granularities = tuple(
        dict.fromkeys(fields.get("timestamp_granularities[]", []) + fields.get("timestamp_granularities", []))
    )
    for g in granularities:
        if g not in GRANULARITIES:
            raise OpenAIError(
                HTTPStatus.BAD_REQUEST,
                f"timestamp_granularities: {g!r} is not one of {', '.join(GRANULARITIES)}",
                "timestamp_granularities",
                "invalid_value",
            )
    if granularities and response_format != "verbose_json":
        raise OpenAIError(
            HTTPStatus.BAD_REQUEST,
            "timestamp_granularities needs response_format=verbose_json",
            "timestamp_granularities",
        )
    stream = (one("stream") or "false").lower()
    if stream not in ("true", "false"):
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"stream must be true or false, got {stream!r}", "stream")
    known = {"file", "model", "language", "prompt", "temperature", "response_format", "stream",
             "timestamp_granularities[]", "timestamp_granularities"}  # fmt: skip
    return TranscriptionRequest(
        audio=audio,
        filename=filename or "upload",
        model=model,
        language=language,
        prompt=one("prompt"),
        temperature=temperature,
        response_format=response_format,
        granularities=granularities,
        stream=stream == "true",
        extra={k: v[-1] for k, v in fields.items() if k not in known},
    )


def render(t: Transcript, req: TranscriptionRequest) -> Response:
    """The answer in the asked ``response_format``."""
    fmt = req.response_format
    if fmt == "json":
        return Response(200, _json({"text": t.text, "usage": _usage(t)}), "application/json")
    if fmt == "text":
        return Response(200, (t.text + "\n").encode(), "text/plain; charset=utf-8")
    if fmt == "srt":
        return Response(200, to_srt(t).encode(), "application/x-subrip; charset=utf-8")
    if fmt == "vtt":
        return Response(200, to_vtt(t).encode(), "text/vtt; charset=utf-8")
    body: dict = {"task": "transcribe", "language": LANGUAGES["en"], "duration": round(t.duration, 3), "text": t.text}
    if req.granularities != ("word",):
        body["segments"] = [_segment(i, s) for i, s in enumerate(t.segments)]
    if req.words:
        body["words"] = [
            {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            for s in t.segments
            for w in s.words
        ]
    body["usage"] = _usage(t)
    return Response(200, _json(body), "application/json")


def _segment(i: int, s: Segment) -> dict:
    return {
        "id": i,
        "seek": round(s.start * SAMPLE_RATE / 160),  # Whisper's seek: the window's first mel frame
        "start": round(s.start, 3),
        "end": round(s.end, 3),
        "text": s.text,
        "tokens": s.tokens,
        "temperature": s.temperature,
        "avg_logprob": s.avg_logprob,
        "compression_ratio": s.compression_ratio,
        "no_speech_prob": s.no_speech_prob,
    }


def _usage(t: Transcript) -> dict:
    return {"type": "duration", "seconds": round(t.duration, 3)}


def _json(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


async def transcriptions(request: Request, files: FileQueue, model_name: str) -> Response:
    """``POST /v1/audio/transcriptions``."""
    loop = asyncio.get_running_loop()
    try:
        # Off the event loop: a 25 MB form is a fair amount of Python work, and live streams wait on the loop.
        fields, uploads = await loop.run_in_executor(None, parse_form, request.headers.get("Content-Type", ""),
                                                     request.body)  # fmt: skip
        req = read_request(fields, uploads, model_name)
        try:
            files.check_room()  # before decoding: a full queue should cost the client nothing
        except QueueFull as exc:
            raise _busy(exc) from None
        try:
            audio = await loop.run_in_executor(None, decode_audio, req.audio, req.filename)
        except AudioError as exc:
            raise OpenAIError(
                HTTPStatus.BAD_REQUEST,
                f"the file could not be decoded as audio: {exc}",
                "file",
                "invalid_value",
            ) from None
        if req.stream:
            return _streamed(files, audio, req)
        try:
            transcript = await files.transcribe(audio, req.options())
        except QueueFull as exc:
            raise _busy(exc) from None
        return render(transcript, req)
    except OpenAIError as exc:
        return exc.response()


def _busy(exc: QueueFull) -> OpenAIError:
    return OpenAIError(
        HTTPStatus.TOO_MANY_REQUESTS,
        f"{exc}: retry in {exc.retry_after_s} s",
        code="rate_limit_exceeded",
        kind="rate_limit_error",
        headers={"Retry-After": str(exc.retry_after_s)},
    )


def _streamed(files: FileQueue, audio, req: TranscriptionRequest) -> Response:
    """``stream=true``: server-sent events, a ``transcript.text.delta`` per segment as its window
    is done, then ``transcript.text.done`` with the whole text. A full queue is still a 429,
    answered before the stream starts."""
    try:
        files.check_room()
    except QueueFull as exc:
        raise _busy(exc) from None
    deltas: asyncio.Queue[str | None] = asyncio.Queue()
    first = [True]

    def on_segment(seg: Segment) -> None:
        text = seg.text if not first[0] else seg.text.lstrip()
        first[0] = False
        deltas.put_nowait(text)

    async def events() -> AsyncIterator[bytes]:
        job = asyncio.ensure_future(files.transcribe(audio, req.options(), on_segment))
        job.add_done_callback(lambda _: deltas.put_nowait(None))
        try:
            while (delta := await deltas.get()) is not None:
                yield _event({"type": "transcript.text.delta", "delta": delta})
            transcript = await job
        except QueueFull as exc:
            yield _event({"type": "error", "error": _busy(exc).error()})
            return
        except Exception as exc:
            yield _event(
                {"type": "error", "error": {"message": f"transcription failed: {exc}", "type": "server_error"}}
            )
            return
        finally:
            if not job.done():
                job.cancel()
        yield _event({"type": "transcript.text.done", "text": transcript.text, "usage": _usage(transcript)})

    return Response(200, content_type="text/event-stream", headers={"X-Accel-Buffering": "no"}, stream=events())


def _event(obj: dict) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


def models(model_name: str, created: int) -> Response:
    """``GET /v1/models``: the one loaded model (and its alias)."""
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "streamd"} for name in (model_name, *ALIASES)
    ]
    return Response(200, _json({"object": "list", "data": data}), "application/json")
