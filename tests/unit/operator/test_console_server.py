"""The console's HTTP server, for real on a loopback port: the page and its files, the Host,
Origin and content-type checks, the token (header and cookie), limits and the event stream."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import OperatorError
from updater.inferctl.main import main as inferctl
from updater.operator.console.server import (
    ConsoleAuthError,
    ConsoleServer,
    ServerLimits,
    read_token,
)

TOKEN = "0123456789abcdef0123"


class App:
    """What the server serves: a state that changes when told, and buttons that record."""

    def __init__(self) -> None:
        self.generation = 0
        self.cond = threading.Condition()
        self.actions: list[tuple[str, str]] = []

    def snapshot_json(self) -> bytes:
        return json.dumps({"generation": self.generation, "devices": []}).encode()

    def wait(self, generation: int, timeout: float) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.generation != generation, timeout)
            return self.generation

    def wake(self) -> None:
        self.change()

    def change(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def halt(self, slot: str) -> str:
        if slot == "busy":
            raise OperatorError("busy is not staged")
        self.actions.append(("halt", slot))
        return f"halted {slot}"

    def resume(self, slot: str) -> str:
        self.actions.append(("resume", slot))
        return f"resumed {slot}"


@pytest.fixture
def make() -> Iterator[Any]:
    servers: list[ConsoleServer] = []

    def start(token: str | None = None, **limits: Any) -> tuple[ConsoleServer, App]:
        app = App()
        srv = ConsoleServer(app, "127.0.0.1:0", token.encode() if token else None,
                            ServerLimits(**limits))  # fmt: skip
        srv.start()
        servers.append(srv)
        return srv, app

    yield start
    for srv in servers:
        srv.stop()


def request(
    srv: ConsoleServer, method: str, path: str, body: Any = None, headers: Any = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, body=data, headers=hdrs | (headers or {}))
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def _until(check: Any, what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_page_and_vendored_files_are_served_with_a_strict_policy(make):
    srv, _ = make()
    status, headers, body = request(srv, "GET", "/")
    assert status == 200 and b"/static/uPlot.iife.min.js" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    status, headers, body = request(srv, "GET", "/static/uPlot.iife.min.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert b"uPlot" in body[:2000]
    status, _, body = request(srv, "GET", "/static/uPlot.LICENSE")
    assert status == 200 and b"MIT License" in body
    for path in ("/static/../server.py", "/static/nope.js", "/etc/passwd", "/api/nope"):
        assert request(srv, "GET", path)[0] == 404, path
    status, _, body = request(srv, "GET", "/api/state")
    assert status == 200 and json.loads(body) == {"generation": 0, "devices": []}
    status, headers, body = request(srv, "HEAD", "/")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert request(srv, "HEAD", "/api/stream")[0] == 405
    assert request(srv, "DELETE", "/api/state")[0] == 501


def test_a_foreign_host_or_origin_and_form_posts_are_refused(make):
    srv, app = make()
    assert request(srv, "GET", "/api/state", headers={"Host": "evil.example:80"})[0] == 403
    assert request(srv, "GET", "/", headers={"Host": f"localhost:{srv.port}"})[0] == 200
    path = "/api/rollouts/classifier/halt"
    evil = {"Origin": "http://evil.example"}
    assert request(srv, "POST", path, {}, headers=evil)[0] == 403
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    conn.request("POST", path, body=b"a=1", headers=form)
    assert conn.getresponse().status == 415
    conn.close()
    assert app.actions == []
    own = {"Origin": f"http://127.0.0.1:{srv.port}"}
    status, _, body = request(srv, "POST", path, {}, headers=own)
    assert status == 200 and json.loads(body)["message"] == "halted classifier"
    status, _, body = request(srv, "POST", "/api/rollouts/busy/halt", {})
    assert status == 409 and json.loads(body) == {"error": "busy is not staged"}
    assert request(srv, "POST", "/api/rollouts/classifier/resume", {})[0] == 200
    assert request(srv, "POST", "/api/rollouts/bad%20name/halt", {})[0] == 404
    assert app.actions == [("halt", "classifier"), ("resume", "classifier")]


def test_bodies_and_connections_are_bounded(make):
    srv, _ = make(max_connections=2, max_body_bytes=1024)
    status, _, _ = request(srv, "POST", "/api/rollouts/x/halt", {"pad": "x" * 2000})
    assert status == 413
    _until(lambda: not srv.httpd.open, "the refused request's connection closed")
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
    try:
        _until(lambda: len(srv.httpd.open) == 2, "two idle connections held")
        # both slots are held by idle connections: the next one is told to come back
        status, headers, _ = request(srv, "GET", "/healthz")
        assert status == 503 and headers["retry-after"] == "1"
    finally:
        for s in idle:
            s.close()


def test_off_loopback_needs_a_token_and_the_token_rules(tmp_path: Path):
    with pytest.raises(ConsoleAuthError, match="reachable from other hosts"):
        read_token(None, "0.0.0.0:8090")
    assert read_token(None, "0.0.0.0:8090", insecure=True) is None
    assert read_token(None, "[::1]:8090") is None
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ConsoleAuthError, match="at least 16 printable"):
        read_token(str(short), "0.0.0.0:8090")
    good = tmp_path / "token"
    good.write_text(TOKEN + "\n")
    assert read_token(str(good), "0.0.0.0:8090") == TOKEN.encode()
    with pytest.raises(ConsoleAuthError, match="cannot read"):
        read_token(str(tmp_path / "missing"), "0.0.0.0:8090")
    with pytest.raises(ConsoleAuthError, match="HOST:PORT"):
        read_token(None, "8090")


def test_inferctl_console_refuses_an_open_listen_in_one_line(tmp_path: Path, capsys):
    code = inferctl(["console", "--repo", str(tmp_path), "--listen", "0.0.0.0:0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "--token-file" in err[0], err
    code = inferctl(["console", "--repo", str(tmp_path), "--steps", "10,5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err == ["inferctl: console: steps must be increasing shares"]
    code = inferctl(["console", "--repo", str(tmp_path), "--id", "a/#"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "--id 'a/#'" in err[0], err


def test_the_token_by_header_or_by_the_login_cookie(make):
    srv, _ = make(token=TOKEN)
    status, _, body = request(srv, "GET", "/")
    assert status == 200 and b'id="login"' in body  # the sign-in form, not the console
    assert request(srv, "GET", "/api/state")[0] == 401
    assert request(srv, "POST", "/api/rollouts/x/halt", {})[0] == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert request(srv, "GET", "/api/state", headers=bearer)[0] == 200
    assert request(srv, "GET", "/api/state", headers={"Authorization": "Bearer nope"})[0] == 401
    assert request(srv, "POST", "/api/login", {"token": "wrong"})[0] == 401
    status, headers, _ = request(srv, "POST", "/api/login", {"token": TOKEN})
    cookie = headers["set-cookie"]
    assert status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    jar = {"Cookie": cookie.split(";")[0]}
    assert request(srv, "GET", "/api/state", headers=jar)[0] == 200
    status, _, body = request(srv, "GET", "/", headers=jar)
    assert b'id="rollouts"' in body


def test_the_event_stream_sends_each_change_and_ends_on_stop(make):
    srv, app = make(stream_min_interval_s=0.0, refresh_s=30.0)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", "/api/stream")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"

    def next_state() -> dict[str, Any]:
        while True:
            line = resp.readline()
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                return json.loads(line[6:])

    assert next_state()["generation"] == 0
    app.change()
    assert next_state()["generation"] == 1
    started = time.monotonic()
    srv.stop()
    resp.read()  # to the end of the stream
    assert time.monotonic() - started < 5  # at once, not after refresh_s
    conn.close()
