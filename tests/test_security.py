"""Tokens, origins, TLS and where settings come from: against a real daemon where it matters."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamd.auth import AccessPolicy
from streamd.server import Daemon, ServerConfig
from streamd.service import ConfigError, settings

TOKEN = "correct-horse-battery-staple"


def _status(policy: AccessPolicy, headers: dict[str, str], query: str = "") -> int | None:
    refusal = policy.check(headers, query)
    return None if refusal is None else int(refusal.status)


def test_without_a_token_only_loopback_hosts_pass_the_access_policy():
    open_policy = AccessPolicy()
    assert _status(open_policy, {"Host": "127.0.0.1:8765"}) is None
    assert _status(open_policy, {"Host": "localhost"}) is None
    assert _status(open_policy, {"Host": "[::1]:8765"}) is None
    assert _status(open_policy, {"Host": "evil.example:8765"}) == 403  # a page rebound to 127.0.0.1
    assert _status(open_policy, {"Host": "127.0.0.1:8765", "Origin": "https://evil.example"}) == 403
    assert _status(open_policy, {"Host": "127.0.0.1:8765", "Origin": "http://127.0.0.1:8765"}) is None


def test_with_a_token_every_request_carries_it_and_configured_origins_pass():
    policy = AccessPolicy(TOKEN, ("https://captions.example",))
    refusal = policy.check({"Host": "box:8765"}, "")
    assert refusal is not None and int(refusal.status) == 401 and "WWW-Authenticate" in refusal.headers
    assert _status(policy, {"Host": "box:8765", "Authorization": f"Bearer {TOKEN}"}) is None
    assert _status(policy, {"Host": "box:8765"}, f"token={TOKEN}") is None
    assert _status(policy, {"Host": "box:8765"}, "token=wrong") == 401
    with_origin = {"Host": "box:8765", "Authorization": f"Bearer {TOKEN}"}
    assert _status(policy, {**with_origin, "Origin": "https://captions.example/"}) is None
    assert _status(policy, {**with_origin, "Origin": "https://other.example"}) == 403


def get(url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), context=context) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture
async def guarded(engine):
    """Listening on every address, as a meeting box on the LAN would, so a token is required."""
    d = Daemon(engine, ServerConfig(host="0.0.0.0", port=0, token=TOKEN, allowed_origins=("https://intranet.example",)))
    await d.start()
    yield d
    await d.shutdown()


async def test_requests_without_the_token_are_refused_before_the_websocket_opens(guarded):
    base = f"http://127.0.0.1:{guarded.port}"
    assert await asyncio.to_thread(get, base + "/healthz") == 401
    assert await asyncio.to_thread(get, base + "/healthz", {"Authorization": "Bearer wrong"}) == 401
    assert await asyncio.to_thread(get, base + "/healthz", {"Authorization": f"Bearer {TOKEN}"}) == 200
    assert await asyncio.to_thread(get, f"{base}/?token={TOKEN}") == 200
    with pytest.raises(InvalidStatus) as info:
        await connect(f"ws://127.0.0.1:{guarded.port}/v1/stream")
    assert info.value.response.status_code == 401
    async with connect(f"ws://127.0.0.1:{guarded.port}/v1/stream?token={TOKEN}") as ws:
        await ws.send(json.dumps({"type": "start"}))
        assert json.loads(await ws.recv())["type"] == "ready"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(f"ws://127.0.0.1:{guarded.port}/v1/captions?source=x", additional_headers=headers):
        pass


async def test_only_the_pages_own_origin_and_configured_ones_may_connect(guarded):
    url = f"ws://127.0.0.1:{guarded.port}/v1/captions?source=x&token={TOKEN}"
    with pytest.raises(InvalidStatus) as info:
        await connect(url, origin="https://evil.example")
    assert info.value.response.status_code == 403
    async with connect(url, origin=f"http://127.0.0.1:{guarded.port}"):  # the captions page itself
        pass
    async with connect(url, origin="https://intranet.example"):
        pass


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_tls(engine, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    d = Daemon(engine, ServerConfig(port=0, tls_cert=str(cert), tls_key=str(key)))
    await d.start()
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        assert d.addresses[0].startswith("https://")
        assert await asyncio.to_thread(get, f"https://127.0.0.1:{d.port}/healthz", None, trust) == 200
        async with connect(f"wss://127.0.0.1:{d.port}/v1/stream", ssl=trust) as ws:
            await ws.send(json.dumps({"type": "start"}))
            assert json.loads(await ws.recv())["type"] == "ready"
        with pytest.raises(ssl.SSLError):  # an untrusted certificate is not accepted by clients
            await connect(f"wss://127.0.0.1:{d.port}/v1/stream", ssl=ssl.create_default_context())
    finally:
        await d.shutdown()


def test_precedence_command_line_then_environment_then_file_then_defaults(tmp_path):
    config = tmp_path / "streamd.toml"
    config.write_text('port = 9000\ntcp_port = 9001\nupdate_s = 1\nallowed_origins = ["https://a", "https://b"]\n')
    args = argparse.Namespace(config=str(config), port=None, tcp_port=9003)
    values = settings(args, {"STREAMD_PORT": "9002", "STREAMD_TCP_PORT": "9999", "STREAMD_REALTIME": "yes"})
    assert values["port"] == 9002  # environment over file
    assert values["tcp_port"] == 9003  # command line over environment
    assert values["update_s"] == 1.0 and values["allowed_origins"] == "https://a,https://b"  # file
    assert values["realtime"] is True and values["max_queue"] == 256  # environment, default
    assert settings(argparse.Namespace(), {"STREAMD_CONFIG": str(config)})["port"] == 9000


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"STREAMD_PORT": "eighty"}, "STREAMD_PORT: port must be int"),
        ({"STREAMD_HOST": "0.0.0.0"}, "not loopback: set token_file"),
        ({"STREAMD_TLS_CERT": "/x.pem"}, "tls_cert and tls_key go together"),
        ({"STREAMD_TOKEN_FILE": "/nonexistent"}, "token_file: cannot read"),
        ({"STREAMD_MAX_QUEUE": "0"}, "max_queue must be at least 1"),
    ],
)
def test_bad_settings_name_the_key(environ, message):
    with pytest.raises(ConfigError, match=message):
        settings(argparse.Namespace(), environ)


def test_config_check_prints_the_effective_settings_or_one_line_and_exit_2(tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("port = 8800\n")
    bad.write_text("port = 8800\nmax_streams = -1\n")
    ok = subprocess.run([sys.executable, "-m", "streamd", "config", "check", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "port = 8800" in ok.stdout and 'host = "127.0.0.1"' in ok.stdout
    no = subprocess.run([sys.executable, "-m", "streamd", "config", "check", str(bad)], capture_output=True, text=True)
    assert no.returncode == 2 and no.stderr.strip() == "streamd: max_streams must be at least 1, got -1"


def test_settings_become_the_servers_config(tmp_path):
    from streamd.service import server_config

    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    values = settings(
        argparse.Namespace(), {"STREAMD_HOST": "0.0.0.0", "STREAMD_TOKEN_FILE": str(token), "STREAMD_UPDATE_S": "0.7"}
    )
    values["allowed_origins"] = "https://a/, https://b"
    config = server_config(values)
    assert config.host == "0.0.0.0" and config.token == TOKEN
    assert config.allowed_origins == ("https://a", "https://b") and config.stream.update_s == 0.7


def test_a_relative_token_file_comes_from_systemds_credentials(tmp_path, monkeypatch):
    from streamd.service import server_config

    (tmp_path / "token").write_text(TOKEN)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    values = settings(argparse.Namespace(), {"STREAMD_HOST": "::", "STREAMD_TOKEN_FILE": "token"})
    assert server_config(values).token == TOKEN


async def test_without_a_token_a_rebound_dns_name_is_refused(engine):
    """A page at evil.example whose name was rebound to 127.0.0.1 sends Host: evil.example."""
    d = Daemon(engine, ServerConfig(port=0))
    await d.start()
    try:
        base = f"http://127.0.0.1:{d.port}/healthz"
        assert await asyncio.to_thread(get, base, {"Host": f"evil.example:{d.port}"}) == 403
        assert await asyncio.to_thread(get, base, {"Host": f"localhost:{d.port}"}) == 200
        assert await asyncio.to_thread(get, base, {"Host": f"[::1]:{d.port}"}) == 200
        assert await asyncio.to_thread(get, base) == 200
    finally:
        await d.shutdown()
