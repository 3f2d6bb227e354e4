"""The daemon's HTTP endpoints: the captions page, health, metrics, sources and their
transcripts, and OpenAI's file transcription API, routed by method and path.

Every plain HTTP request on the port comes here from :mod:`streamd.http`; websocket upgrades
never do (the server checks those in the handshake). Access is checked first, the same way for
both: the token, the ``Host`` and the ``Origin`` (:mod:`streamd.auth`); under ``/v1/audio`` and
``/v1/models`` a refusal is in OpenAI's error shape, which its SDK reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from urllib.parse import unquote

from .auth import AccessPolicy, is_loopback_address
from .files import FileQueue
from .formats import TRANSCRIPT_FORMATS, render_sessions
from .http import Request, Response, text_response
from .hub import Hub
from .metrics import Metrics
from .openai_files import OpenAIError, models, transcriptions
from .status import Status

__all__ = ["WebApi"]

WEBSOCKET_PATHS = ("/v1/stream", "/v1/captions", "/v1/realtime", "/v1/listen")


@dataclass
class WebApi:
    """What the endpoints read: the daemon's parts, passed in (this module imports no server)."""

    access: AccessPolicy
    status: Status
    metrics: Metrics
    hub: Hub
    files: FileQueue
    model_name: str
    started: float = field(default_factory=time.time)  # wall clock: the ``created`` of ``/v1/models``
    on_drain: Callable[[float | None], None] | None = None  # ``POST /v1/drain[?timeout_s=S]``

    def __post_init__(self) -> None:
        self.page = _load_page()
        self.get: dict[str, Callable[[Request], Response]] = {
            "/": self._page,
            "/index.html": self._page,
            "/healthz": self._health,
            "/v1/sources": lambda r: _json_response({"sources": self.status.sources()}),
            "/metrics": self._metrics,
            "/v1/models": lambda r: models(self.model_name, int(self.started)),
        }

    async def handle(self, request: Request) -> Response:
        path = request.path
        openai = path.startswith("/v1/audio/") or path == "/v1/models"
        refusal = self.access.check(request.headers, request.query)
        if refusal is not None:
            if openai:
                kind = "invalid_request_error" if refusal.status == HTTPStatus.UNAUTHORIZED else "permission_error"
                code = "invalid_api_key" if refusal.status == HTTPStatus.UNAUTHORIZED else None
                return OpenAIError(refusal.status, refusal.body.strip(), None, code, kind, refusal.headers).response()
            return text_response(refusal.status, refusal.body, refusal.headers)
        if path == "/v1/audio/transcriptions":
            if request.method != "POST":
                return _not_allowed("POST", openai=True)
            return await transcriptions(request, self.files, self.model_name)
        if path == "/v1/drain":
            return self._drain(request)
        if path in WEBSOCKET_PATHS:
            return text_response(
                HTTPStatus.UPGRADE_REQUIRED, f"{path} is a websocket: connect with Upgrade: websocket\n",
                {"Upgrade": "websocket", "Connection": "Upgrade"},
            )  # fmt: skip
        endpoint = self.get.get(path)
        if endpoint is None and path.startswith("/v1/sources/") and path.endswith("/transcript"):
            endpoint = self._transcript
        if endpoint is None:
            if openai:
                return OpenAIError(HTTPStatus.NOT_FOUND, f"no such endpoint {path}", code="unknown_url").response()
            return text_response(HTTPStatus.NOT_FOUND, f"no such path {path}: see / and /healthz\n")
        if request.method not in ("GET", "HEAD"):
            return _not_allowed("GET, HEAD", openai)
        return endpoint(request)

    def _health(self, request: Request) -> Response:
        """200 while the node takes new streams; 503 once it drains or stops, so that a proxy's
        health check sends new sources elsewhere (the body says which)."""
        health = self.status.health()
        return _json_response(health, 200 if health["status"] == "ok" else 503)

    def _drain(self, request: Request) -> Response:
        """``streamd drain``: finish the live streams, take no new ones, then stop (as SIGTERM does
        with ``drain_s``). From this machine only, whatever token a request carries."""
        if request.method != "POST":
            return _not_allowed("POST", openai=False)
        if not is_loopback_address(request.peer):
            return text_response(HTTPStatus.FORBIDDEN, "drain is for this machine's own streamd command\n")
        if self.on_drain is None:
            return text_response(HTTPStatus.NOT_IMPLEMENTED, "this daemon runs without a service to stop\n")
        timeout = request.arg("timeout_s")
        try:
            timeout_s = None if timeout is None else float(timeout)
        except ValueError:
            timeout_s = -1.0
        if timeout_s is not None and not 0 < timeout_s < 86400:
            return text_response(HTTPStatus.BAD_REQUEST, f"timeout_s must be 0 to 86400 seconds, got {timeout!r}\n")
        self.on_drain(timeout_s)
        return _json_response({"status": "draining"}, 202)

    def _page(self, request: Request) -> Response:
        if self.page is None:
            return text_response(HTTPStatus.NOT_FOUND, "captions page not installed\n")
        return Response(200, self.page, "text/html; charset=utf-8")

    def _metrics(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(200, body, content_type)

    def _transcript(self, request: Request) -> Response:
        """``GET /v1/sources/{id}/transcript?format=txt|srt|vtt|json``: every final of the source
        the store keeps (without a store: the live session's), its sessions in order."""
        source_id = unquote(request.path[len("/v1/sources/") : -len("/transcript")])
        fmt = request.arg("format", "txt")
        if fmt not in TRANSCRIPT_FORMATS:
            return text_response(HTTPStatus.BAD_REQUEST, f"format must be one of {', '.join(TRANSCRIPT_FORMATS)}\n")
        live = self.hub.sources.get(source_id)
        if self.hub.store is not None:
            sessions = [
                (s.session, s.started, [json.loads(m) for m in s.finals]) for s in self.hub.store.sessions(source_id)
            ]
        elif live is not None:
            sessions = [(live.session, live.started, [json.loads(m.text) for m in live.finals_after(0)])]
        else:
            sessions = []
        if not sessions:
            return text_response(HTTPStatus.NOT_FOUND, f"no transcript of source {source_id!r}\n")
        body, content_type = render_sessions(source_id, sessions, fmt)
        return Response(200, body.encode(), content_type)


def _not_allowed(allow: str, openai: bool) -> Response:
    message = f"this endpoint takes {allow}"
    if openai:
        response = OpenAIError(HTTPStatus.METHOD_NOT_ALLOWED, message, code="method_not_allowed").response()
    else:
        response = text_response(HTTPStatus.METHOD_NOT_ALLOWED, message + "\n")
    response.headers["Allow"] = allow
    return response


def _json_response(obj: object, status: int = 200) -> Response:
    return Response(status, (json.dumps(obj, indent=1) + "\n").encode(), "application/json")


def _load_page() -> bytes | None:
    try:
        return (resources.files("streamd") / "web" / "index.html").read_bytes()
    except (FileNotFoundError, OSError):
        return None
