"""The live-captions page (``streamd/web/index.html``) in a real headless Chromium against a real
``streamd serve`` reading the JFK recording at real-time pace, then across a daemon restart.

Needs Debian's ``chromium`` (or ``$STREAMD_CHROMIUM``) and the ``playwright`` Python package; no
browser is ever downloaded (``playwright install`` is not used). Playwright starts Chromium with
``--no-sandbox`` by default, which is what running it as root needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import speech_file

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the captions page test needs `pip install playwright` (no browser download)"
)

CHROMIUM = os.environ.get("STREAMD_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: `apt-get install chromium` or set STREAMD_CHROMIUM to a Chrome binary"
)

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "streamd" / "web" / "index.html"
WAV = speech_file("dev_jfk_inaugural_1961")
SOURCE = WAV.stem

# What the page shows, read in one go: state, sessions with their finals, the partial, scrolling.
SNAPSHOT_JS = """() => {
  const c = document.getElementById('captions');
  const partial = document.querySelector('#captions .partial');
  return {
    state: document.getElementById('status').dataset.state,
    sessions: [...document.querySelectorAll('#captions .session')].map(s => ({
      id: s.dataset.session,
      finals: [...s.querySelectorAll('.final')].map(f => [Number(f.dataset.segment), f.textContent]),
    })),
    partial: partial ? partial.textContent : null,
    partialGrey: partial ? getComputedStyle(partial).color !== getComputedStyle(document.body).color : null,
    overflow: c.scrollHeight - c.clientHeight,
    fromBottom: c.scrollHeight - c.scrollTop - c.clientHeight,
  };
}"""


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """``streamd serve`` on one port, startable again after a stop (a daemon restart)."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log, self.proc = port, log, None

    def start(self, timeout: float = 30) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamd", "serve", "--port", str(self.port), "--file", str(WAV), "--realtime"],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"streamd serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail(f"streamd serve did not answer /healthz in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def live_sources(self) -> list[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/sources", timeout=2) as r:
            return [s["id"] for s in json.load(r)["sources"]]

    def stop(self) -> None:
        """SIGTERM, as systemd stops it; SIGKILL only if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(free_port(), tmp_path / "streamd.log")
    d.start()
    yield d
    d.stop()


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        # A small window, so that the captions overflow and scrolling is really tested.
        pg = browser.new_page(viewport={"width": 480, "height": 220})
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        try:
            yield pg
        finally:
            browser.close()


def watch(page, until, timeout: float, what: str, seen: list[dict]) -> dict:
    """Poll the page until ``until(snapshot)``; every snapshot is checked and kept in ``seen``."""
    deadline = time.monotonic() + timeout
    while True:
        snap = page.evaluate(SNAPSHOT_JS)
        seen.append(snap)
        keys = [(s["id"], seg) for s in snap["sessions"] for seg, _ in s["finals"]]
        assert len(keys) == len(set(keys)), f"a final is shown twice: {snap}"
        if snap["overflow"] > 0:
            assert snap["fromBottom"] <= 2, f"the page did not follow the captions to the bottom: {snap}"
        if until(snap):
            return snap
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {snap}"
        time.sleep(0.1)


def session_text(session: dict) -> str:
    return " ".join(text for _, text in session["finals"])


def test_live_captions_page_through_a_daemon_restart(daemon, page):
    reference = words((WAV.with_suffix(".txt")).read_text())
    seen: list[dict] = []
    page.goto(f"http://127.0.0.1:{daemon.port}/?source={SOURCE}")
    assert page.get_attribute("#captions", "aria-live") == "polite"

    # The file plays once at real-time pace (11 s): finals, partials before them, then `end`.
    # Mid-way the page's socket drops: it reconnects to the same session, whose finals the
    # daemon replays, and must not show them twice.
    watch(page, lambda s: s["sessions"] and s["sessions"][0]["finals"], 30, "the first final", seen)
    page.evaluate("ws.close()")
    watch(page, lambda s: s["state"] == "reconnecting", 5, "the page to see its socket close", seen)

    def over(snap: dict) -> bool:  # (had it ended during that reconnect, the page waits for the source again)
        return snap["state"] == "ended" or (snap["state"] == "waiting" and SOURCE not in daemon.live_sources())

    snap = watch(page, over, 40, "the session to end", seen)
    assert len(snap["sessions"]) == 1, snap
    first = snap["sessions"][0]
    shown = words(session_text(first))
    found = sum(w in set(shown) for w in reference) / len(reference)
    assert found >= 0.6, f"only {found:.0%} of the reference words are shown: {shown}"
    assert len(shown) <= 1.3 * len(reference), f"more text than was said (shown twice?): {shown}"
    partials = [s for s in seen if s["partial"]]
    assert partials, "no partial was ever shown"
    assert all(s["partialGrey"] for s in partials), "the partial is not set apart from the finals"
    assert snap["partial"] is None, "a partial is left after the session ended"
    assert snap["overflow"] > 0, "the captions never overflowed the window: the scrolling check did not run"

    # Daemon restart: the page says it is reconnecting, then goes live on the new session.
    daemon.stop()
    watch(page, lambda s: s["state"] == "reconnecting", 10, "the page to notice the daemon is gone", seen)
    daemon.start()
    snap = watch(
        page,
        lambda s: s["state"] == "live" and len(s["sessions"]) == 2 and s["sessions"][1]["finals"],
        40,
        "the first final of the new session",
        seen,
    )
    assert snap["sessions"][0] == first, "the earlier session's finals changed after the reconnect"
    assert snap["sessions"][1]["id"] != first["id"]
    assert page.locator("#captions .break").count() == 1, "no visible break between the two sessions"

    # A reader who scrolls up is left there while captions keep coming, with a way back down.
    page.evaluate("document.getElementById('captions').scrollTop = 0")
    page.wait_for_selector("#jump", state="visible", timeout=2_000)
    count = len(snap["sessions"][1]["finals"])
    page.wait_for_function(
        f"document.querySelectorAll('#captions .session')[1].querySelectorAll('.final').length > {count}",
        timeout=20_000,
    )
    assert page.evaluate("document.getElementById('captions').scrollTop") == 0, "scrolled away from the reader"
    page.click("#jump")
    watch(page, lambda s: s["fromBottom"] <= 2, 5, "the jump back to the live captions", seen)
    assert not page.errors, page.errors


def test_page_follows_protocol_v1_messages(page):
    """The page alone, its websocket answered by the test: dedupe, sessions, escaping, reconnect."""
    sockets = []  # (url, route) per connection the page opens
    page.route(
        "http://streamd.test/**",
        lambda route: (
            route.fulfill(
                content_type="application/json",
                body=json.dumps({"sources": [{"id": "room-1", "kind": "websocket", "live": True, "time": 1.0}]}),
            )
            if "/v1/sources" in route.request.url
            else route.fulfill(content_type="text/html; charset=utf-8", body=PAGE.read_text())
        ),
    )
    page.route_web_socket("**/v1/captions*", lambda ws: sockets.append(ws))

    def next_socket(n: int):
        for _ in range(100):
            if len(sockets) >= n:
                return sockets[n - 1]
            page.wait_for_timeout(50)
        pytest.fail(f"the page opened {len(sockets)} websocket(s), expected {n}")

    def send(ws, **msg):
        ws.send(json.dumps(msg))

    def state():
        page.wait_for_timeout(50)  # let the page handle what was sent
        return page.evaluate(SNAPSHOT_JS)

    page.goto("http://streamd.test/?source=room-1&token=s3cret")
    ws = next_socket(1)
    assert "source=room-1" in ws.url and "token=s3cret" in ws.url
    assert page.input_value("#sources") == "room-1"

    send(ws, type="ready", seq=0, protocol=1, session="A", source="room-1", model="tiny.en", devices={})
    send(ws, type="partial", seq=1, segment=0, start=0, end=1, text="<b>bold</b> &amp")
    snap = state()
    assert snap["state"] == "live" and snap["partial"] == "<b>bold</b> &amp" and snap["partialGrey"]
    send(ws, type="final", seq=2, segment=0, start=0, end=1, text=" <b>bold</b> & co", words=[])
    send(ws, type="partial", seq=3, segment=1, start=1, end=2, text="second")
    send(ws, type="final", seq=4, segment=1, start=1, end=2, text="second one", words=[])
    send(ws, type="final", seq=2, segment=0, start=0, end=1, text="<b>bold</b> & co", words=[])  # a repeat
    snap = state()
    assert snap["sessions"] == [{"id": "A", "finals": [[0, "<b>bold</b> & co "], [1, "second one "]]}]
    assert snap["partial"] is None, "the final did not replace its partial"
    assert page.locator("#captions b").count() == 0, "message text was parsed as HTML"

    # The socket drops mid-session; the reconnect replays the session's finals, shown once.
    ws.close(code=1011, reason="test")
    assert state()["state"] == "reconnecting"
    ws = next_socket(2)
    send(ws, type="ready", seq=0, protocol=1, session="A", source="room-1", model="tiny.en", devices={})
    send(ws, type="final", seq=2, segment=0, start=0, end=1, text="<b>bold</b> & co", words=[])
    send(ws, type="final", seq=4, segment=1, start=1, end=2, text="second one", words=[])
    send(ws, type="final", seq=6, segment=2, start=2, end=3, text="missed while away", words=[])
    send(ws, type="partial", seq=7, segment=3, start=3, end=4, text="pending")
    send(ws, type="end", seq=8)
    snap = state()
    assert [seg for seg, _ in snap["sessions"][0]["finals"]] == [0, 1, 2]
    assert snap["state"] == "ended" and snap["partial"] is None

    # The source starts again on the same socket: a new session, segments from 0, a break.
    send(ws, type="ready", seq=0, protocol=1, session="B", source="room-1", model="tiny.en", devices={})
    send(ws, type="final", seq=1, segment=0, start=0, end=1, text="new session", words=[])
    snap = state()
    assert [s["id"] for s in snap["sessions"]] == ["A", "B"] and snap["state"] == "live"
    assert snap["sessions"][1]["finals"] == [[0, "new session "]]
    assert page.locator("#captions .break").count() == 1

    # A fatal error about the request itself: shown, and no reconnect loop.
    send(ws, type="error", seq=0, code="bad_request", message="no such thing", fatal=True)
    ws.close(code=1008, reason="bad request")
    snap = state()
    assert snap["state"] == "error" and "no such thing" in page.text_content("#error")
    page.wait_for_timeout(800)
    assert len(sockets) == 2, "the page kept reconnecting after a fatal error"

    # Choosing another source starts afresh on a new socket.
    page.fill("#source-id", "room-2")
    page.click("#manual button")
    ws = next_socket(3)
    assert "source=room-2" in ws.url and "source=room-2" in page.url
    assert state()["sessions"] == [] and state()["state"] in ("connecting", "waiting")
    assert not page.errors, page.errors


def test_a_caption_arriving_before_the_scroll_event_leaves_the_reader_where_they_scrolled(page):
    """The browser sends ``scroll`` a frame after the view moves; a caption handled in between once
    pulled the reader back to the bottom (seen in CI: the jump button never showed). Here the
    caption is handled in the same task as the scroll, so no scroll event can come first."""
    page.route(
        "http://streamd.test/**",
        lambda route: (
            route.fulfill(content_type="application/json", body=json.dumps({"sources": []}))
            if "/v1/sources" in route.request.url
            else route.fulfill(content_type="text/html; charset=utf-8", body=PAGE.read_text())
        ),
    )
    page.route_web_socket("**/v1/captions*", lambda ws: None)
    page.goto("http://streamd.test/?source=room-1")
    page.evaluate("""() => {
      onMessage({type: "ready", seq: 0, protocol: 1, session: "A", source: "room-1", devices: {}});
      for (let i = 0; i < 40; i++)
        onMessage({type: "final", seq: i + 1, segment: i, start: i, end: i + 1, text: `line ${i} of the talk`});
    }""")
    snap = page.evaluate(SNAPSHOT_JS)
    assert snap["overflow"] > 100 and snap["fromBottom"] <= 2, snap
    top = page.evaluate("""() => {
      const c = document.getElementById('captions');
      c.scrollTop = 0;
      onMessage({type: "final", seq: 99, segment: 40, start: 40, end: 41, text: "said while scrolling"});
      return c.scrollTop;
    }""")
    assert top == 0, "the caption pulled the reader back to the bottom"
    page.wait_for_selector("#jump", state="visible", timeout=2_000)
    page.wait_for_timeout(100)  # the late scroll event, and a caption after it
    page.evaluate('onMessage({type: "final", seq: 100, segment: 41, start: 41, end: 42, text: "and after"})')
    assert page.evaluate("document.getElementById('captions').scrollTop") == 0
    page.click("#jump")
    assert page.evaluate(SNAPSHOT_JS)["fromBottom"] <= 2
    page.evaluate("window.dispatchEvent(new Event('resize'))")  # a resize while following keeps following
    page.evaluate('onMessage({type: "final", seq: 101, segment: 42, start: 42, end: 43, text: "still live"})')
    assert page.evaluate(SNAPSHOT_JS)["fromBottom"] <= 2 and not page.is_visible("#jump")
    assert not page.errors, page.errors
