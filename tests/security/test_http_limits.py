"""Slow and many clients (issue 13, "Idle connections take the API down" and "SIGTERM hangs"):
timeouts close what clients leave open, connections cost no thread, the cap answers 503 only when
no connection is idle, ``api.workers`` bounds requests running at once, and SIGTERM ends the
daemon within 5 s whatever clients are doing."""

from __future__ import annotations

import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.security.rawhttp import DEMO, Front, parse_responses, read_to_eof, serving

HEALTH = b"GET /v2/health/live HTTP/1.1\r\nHost: HOST\r\n\r\n"


def connect(front: Front, first: bytes = b"") -> socket.socket:
    s = socket.create_connection((front.host, front.port), timeout=10)
    if first:
        s.sendall(first.replace(b"HOST", front.host_header))
    return s


def closed_within(s: socket.socket, timeout: float) -> bytes:
    """What the server sent before closing ``s``; fails if it stays open past ``timeout``."""
    return read_to_eof(s, timeout)


def test_timeouts_close_what_clients_leave_open(tmp_path: Path) -> None:
    with serving(tmp_path, idle_timeout_s=0.5, header_timeout_s=0.5, body_timeout_s=0.5) as front:
        start = time.monotonic()
        idle = connect(front)
        half_head = connect(front, b"GET /v2/health/live HTTP/1.1\r\nHost: HO")
        half_body = connect(
            front,
            b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: HOST\r\nContent-Length: 99\r\n\r\n{",
        )
        after_one = connect(front, HEALTH)
        assert closed_within(idle, 3) == b""
        assert [r.status for r in parse_responses(closed_within(half_head, 3))] == [408]
        assert [r.status for r in parse_responses(closed_within(half_body, 3))] == [408]
        assert [r.status for r in parse_responses(closed_within(after_one, 3))] == [200]
        assert time.monotonic() - start < 3
        for s in (idle, half_head, half_body, after_one):
            s.close()
        assert front.get_ok()


def test_slowloris_trickle_is_cut_at_the_header_timeout(tmp_path: Path) -> None:
    """A byte every 0.1 s keeps the connection active but never finishes the head."""
    with serving(tmp_path, header_timeout_s=1.0) as front:
        s = connect(front, b"GET /v2/health/live HTTP/1.1\r\n")
        start = time.monotonic()
        try:
            while time.monotonic() - start < 5:
                s.sendall(b"X-Slow: y\r\n")
                time.sleep(0.1)
        except OSError:
            pass  # the server closed the connection
        assert time.monotonic() - start < 2.5, "the trickle held the connection"
        s.close()


def test_connection_cap_evicts_idle_and_refuses_when_all_are_busy(tmp_path: Path) -> None:
    with serving(tmp_path, max_connections=4) as front:
        idle = [connect(front) for _ in range(4)]
        time.sleep(0.2)
        assert front.get_ok(), "an idle connection makes room for a new client"
        evicted = [s for s in idle if closed_or_open(s)]
        assert evicted, "the longest-idle connection was closed"
        for s in idle:
            s.close()
        time.sleep(0.2)
        busy = [connect(front, b"GET /v2/health/live HTTP/1.1\r\nHost: H") for _ in range(4)]
        time.sleep(0.2)
        extra = connect(front)
        replies = parse_responses(closed_within(extra, 3))
        assert [r.status for r in replies] == [503]
        assert b"max_connections" in replies[0].body
        for s in busy:
            s.close()
        extra.close()
        time.sleep(0.2)
        assert front.get_ok()


def closed_or_open(s: socket.socket) -> bool:
    """True when the server has closed ``s`` (EOF or reset) without sending anything."""
    s.settimeout(0.5)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_workers_bound_requests_running_at_once(tmp_path: Path) -> None:
    """With api.workers 1, four clients' slow requests run one at a time; health checks are
    answered meanwhile."""
    running = 0
    most = 0
    lock = threading.Lock()

    def slow(model: str, body: bytes) -> Mapping[str, Any]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.2)
        with lock:
            running -= 1
        return {"accepted": 1}

    with serving(tmp_path, workers=1) as front:
        front.api.feedback = slow
        request = (
            b"POST /v2/models/demo/feedback HTTP/1.1\r\nHost: HOST\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        results: list[int] = []
        clients = [
            threading.Thread(
                target=lambda: results.extend(r.status for r in front.request(request))
            )
            for _ in range(4)
        ]
        for t in clients:
            t.start()
        time.sleep(0.1)
        start = time.monotonic()
        assert front.get_ok()
        assert time.monotonic() - start < 0.15, "health waited behind the worker"
        for t in clients:
            t.join(10)
        assert results == [200] * 4
        assert most == 1


def test_idle_flood_keeps_the_daemon_serving_without_threads(
    inferd_daemon: Callable[..., Any],
) -> None:
    """600 silent sockets: no thread each, health keeps answering, all closed after the idle
    timeout (with a thread each, 60 of them exhausted the unit's TasksMax)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    daemon = inferd_daemon(
        {
            "models": [{"name": "demo", "path": str(DEMO)}],
            "api": {"idle_timeout_s": 2, "max_connections": 64},
        }
    )
    threads_before = threads_of(daemon.proc.pid)
    socks = []
    try:
        for _ in range(600):
            socks.append(socket.create_connection((daemon.host, daemon.port), timeout=10))
        time.sleep(0.3)
        assert threads_of(daemon.proc.pid) <= threads_before, "a connection cost a thread"
        for _ in range(5):  # a new client gets in (an idle one makes room)
            with socket.create_connection((daemon.host, daemon.port), timeout=5) as s:
                s.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: {daemon.host}:{daemon.port}"
                          "\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
                assert [r.status for r in parse_responses(read_to_eof(s, 5))] == [200]
        deadline = time.monotonic() + 2 + 3
        for s in socks:
            closed_within(s, max(0.1, deadline - time.monotonic()))
    finally:
        for s in socks:
            s.close()
    daemon._conn = None  # its keep-alive connection was idle too: closed like the others
    assert daemon.request("GET", "/v2/health/ready")[0] == 200


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_sigterm_exits_within_5s_whatever_clients_do(
    inferd_daemon: Callable[..., Any],
) -> None:
    daemon = inferd_daemon({"models": [{"name": "demo", "path": str(DEMO)}]})
    addr = (daemon.host, daemon.port)
    host = f"Host: {daemon.host}:{daemon.port}\r\n".encode()
    half_body = socket.create_connection(addr)
    half_body.sendall(
        b"POST /v2/models/demo/infer HTTP/1.1\r\n" + host + b'Content-Length: 100000\r\n\r\n{"in'
    )
    half_head = socket.create_connection(addr)
    half_head.sendall(b"POST /v2/models/demo/infer HTTP/1.1\r\n" + host)
    idle = socket.create_connection(addr)
    not_reading = socket.create_connection(addr)
    not_reading.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    not_reading.sendall((b"GET /metrics HTTP/1.1\r\n" + host + b"\r\n") * 2000)
    time.sleep(0.5)
    start = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        code = daemon.proc.wait(5)
    except Exception:
        daemon.proc.kill()
        pytest.fail(f"the daemon was still up 5 s after SIGTERM: {daemon.stderr()}")
    finally:
        for s in (half_body, half_head, idle, not_reading):
            s.close()
    assert code == 0, daemon.stderr()
    assert time.monotonic() - start < 5
    assert "Traceback" not in daemon.stderr()
