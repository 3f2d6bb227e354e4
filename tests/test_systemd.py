"""The systemd integration: the notify protocol on a real datagram socket, and the unit file."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamd.notify import Notifier

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "streamd.service"


def datagram_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    return sock, path


def test_notifier_sends_datagrams_and_is_silent_outside_systemd(tmp_path):
    sock, path = datagram_socket(tmp_path)
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert notifier.enabled and notifier.watchdog_s == 4.0
    assert notifier.notify("READY=1", "STATUS=hello")
    assert sock.recv(4096) == b"READY=1\nSTATUS=hello"
    assert not Notifier({}).notify("READY=1")
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None


def test_abstract_socket_names():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"streamd-test-{os.getpid()}"
    sock.bind("\0" + name)
    sock.settimeout(5)
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify("WATCHDOG=1")
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_the_daemon_reports_ready_pings_the_watchdog_and_says_stopping(tmp_path):
    sock, path = datagram_socket(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamd", "serve", "--port", "0"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1\nSTATUS=serving tiny.en on http://127.0.0.1:"), first
        started, pings = time.monotonic(), 0
        while pings < 2:
            message = sock.recv(4096).decode()
            pings += "WATCHDOG=1" in message.splitlines()
        assert time.monotonic() - started < 5  # WatchdogSec=2 s: a ping at least every second
        proc.send_signal(signal.SIGTERM)
        while not (message := sock.recv(4096).decode()).startswith("STOPPING=1"):
            pass
        assert "STATUS=finalising 0 stream(s)" in message
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian package systemd)"
)


@pytest.fixture
def installed_unit(tmp_path) -> Path:
    """The unit with ExecStart pointing at this checkout's streamd (verify checks that it exists)."""
    streamd = shutil.which("streamd", path=str(Path(sys.executable).parent)) or "/usr/bin/true"
    unit = tmp_path / "streamd.service"
    unit.write_text(UNIT.read_text().replace("/opt/streamd/bin/streamd", streamd))
    return unit


@needs_systemd
def test_unit_verifies_clean(installed_unit):
    result = subprocess.run(["systemd-analyze", "verify", str(installed_unit)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@needs_systemd
def test_unit_exposure_is_at_most_2(installed_unit):
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(installed_unit)],
        capture_output=True,
        text=True,
    )
    score = float(result.stdout.rsplit("Overall exposure level for", 1)[1].split(":")[1].split()[0])
    assert score <= 2.0, result.stdout[-2000:]
    unit = UNIT.read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "DynamicUser=yes", "NoNewPrivileges=yes"):
        assert setting in unit


def test_under_journald_logs_carry_their_priority(tmp_path):
    sock, path = datagram_socket(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": path, "JOURNAL_STREAM": "8:1234"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamd", "serve", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert sock.recv(4096).startswith(b"READY=1")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = out.splitlines()
    assert any(line.startswith("<6>streamd.server: listening on http://127.0.0.1:") for line in lines), out
    assert any(line.startswith("<6>whisper_engine.backends: backend auto: cpu (xdna not used: ") for line in lines), out
    assert all(line[:3] in ("<7>", "<6>", "<4>", "<3>", "<2>") or line.startswith("    ") for line in lines), out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


needs_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed (package systemd)"
)


def socket_activate(address: str) -> subprocess.Popen:
    """``streamd serve`` behind systemd-socket-activate: started by the first connection, with
    the listening socket passed in as systemd would."""
    return subprocess.Popen(
        ["systemd-socket-activate", "-l", address, sys.executable, "-m", "streamd", "serve"],
        stderr=subprocess.PIPE,
        text=True,
    )


@needs_activate
def test_socket_activation_serves_on_the_socket_systemd_passes():
    import urllib.request

    port = free_port()
    proc = socket_activate(f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:  # the first connection starts the daemon; it answers once the model is loaded
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert f"serving tiny.en on http://127.0.0.1:{port}" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@needs_activate
def test_a_passed_socket_off_loopback_needs_a_token():
    port = free_port()
    proc = socket_activate(f"0.0.0.0:{port}")
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = s.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # refused: closed without an answer
        assert proc.wait(timeout=30) == 2
        assert "is not loopback: set token_file" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@needs_systemd
def test_socket_unit_verifies_clean(tmp_path, installed_unit):
    socket_unit = tmp_path / "streamd.socket"
    socket_unit.write_text((ROOT / "systemd" / "streamd.socket").read_text())
    result = subprocess.run(
        ["systemd-analyze", "verify", str(socket_unit), str(installed_unit)], capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@needs_systemd
def test_the_two_node_drop_in_verifies_clean_on_the_unit_as_a_template(tmp_path, installed_unit):
    """deploy/streamd@.service.d/node.conf (nodes behind HAProxy) on the shipped unit copied as
    ``streamd@.service``, as its comment says to install it."""
    (tmp_path / "streamd@.service").write_text(installed_unit.read_text())
    drop_in = tmp_path / "streamd@.service.d"
    drop_in.mkdir()
    conf = (ROOT / "deploy" / "streamd@.service.d" / "node.conf").read_text()
    (drop_in / "node.conf").write_text(conf)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "streamd@8765.service")],
        capture_output=True, text=True, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )  # fmt: skip
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert "STREAMD_DRAIN_S=" in conf and "TimeoutStopSec=" in conf
