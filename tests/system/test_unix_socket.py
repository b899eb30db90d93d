"""The local API on a unix socket (``api.listen: unix:PATH``), with real ``inferd run`` processes:
a socket file left behind by a killed daemon is replaced, the socket is 0660 (the service's group
may call it, nobody else), and the systemd watchdog's health probe speaks AF_UNIX: pings flow
while the socket answers and stop when it no longer does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProc, start_daemon
from tests.support.models import classifier
from tests.support.sdnotify import NotifyListener


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: a unix socket path is limited to 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="uds-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _get(path: Path, target: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.1 GET over the unix socket; (status, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _wait_ready(daemon: DaemonProc, path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert daemon.proc.poll() is None, daemon.stderr()
        try:
            if _get(path, "/v2/health/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not ready on {path}: {daemon.stderr()}")


def _exit_code(daemon: DaemonProc, timeout: float = 30.0) -> int | None:
    """The daemon's exit code, or None if it is still running after ``timeout``."""
    try:
        return daemon.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _config(tmp_path: Path, sock: Path) -> dict[str, object]:
    model = classifier(tmp_path / "m.onnx")
    return {"models": [{"name": "m", "path": str(model)}], "api": {"listen": f"unix:{sock}"}}


def test_the_socket_is_0660_and_a_killed_daemons_socket_file_is_replaced(
    tmp_path: Path, short_dir: Path
) -> None:
    sock = short_dir / "api.sock"
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    first = start_daemon(first_dir, _config(tmp_path, sock), wait=False)
    try:
        _wait_ready(first, sock)
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    finally:
        first.proc.send_signal(signal.SIGKILL)  # no clean shutdown: the file stays behind
        first.proc.wait(10)
    assert sock.exists(), "the killed daemon left its socket file"
    with pytest.raises(ConnectionRefusedError):
        _get(sock, "/v2/health/live")
    second = start_daemon(second_dir, _config(tmp_path, sock), wait=False)
    try:
        _wait_ready(second, sock)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        status, body = _get(sock, "/v2/models/m")
        assert status == 200 and b'"name":"m"' in body, body
    finally:
        assert second.stop() == 0, second.stderr()
    assert not sock.exists(), "a clean stop removes the socket file"


def test_a_second_daemon_does_not_take_over_a_live_socket_or_a_file(
    tmp_path: Path, short_dir: Path
) -> None:
    """A second daemon on the path of a live one exits with one line and takes nothing away
    (before, it unlinked the file and the first daemon kept running, unreachable); a path that
    is a plain file is refused, not deleted."""
    sock = short_dir / "api.sock"
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    first = start_daemon(first_dir, _config(tmp_path, sock), wait=False)
    second: DaemonProc | None = None
    try:
        _wait_ready(first, sock)
        second = start_daemon(second_dir, _config(tmp_path, sock), wait=False)
        assert _exit_code(second) != 0
        assert "another process is serving on this socket" in second.stderr(), second.stderr()
        assert _get(sock, "/v2/health/ready")[0] == 200, "the first daemon still answers"
    finally:
        if second is not None:
            second.stop()  # one that took over (the bug) must not outlive the test
        assert first.stop() == 0, first.stderr()
    plain = short_dir / "not-a-socket"
    plain.write_text("keep me")
    third = start_daemon(second_dir, _config(tmp_path, plain), wait=False)
    try:
        assert _exit_code(third) != 0
        assert "exists and is not a socket" in third.stderr(), third.stderr()
    finally:
        third.stop()
    assert plain.read_text() == "keep me"


def test_the_watchdog_probes_the_unix_socket_and_starves_when_it_is_gone(
    tmp_path: Path, short_dir: Path, notify_socket: tuple[str, NotifyListener]
) -> None:
    """Pings while GET /v2/health/live answers on the socket; once the socket file is deleted
    (a tmpfiles clean-up of /run, a hand) clients cannot reach the API, and neither can the
    probe: the pings stop, so systemd restarts the daemon, which makes the socket again."""
    notify, listener = notify_socket
    sock = short_dir / "api.sock"
    env = {"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "400000"}
    daemon = start_daemon(tmp_path, _config(tmp_path, sock), env, wait=False)
    try:
        listener.wait_for("READY")
        listener.wait_for("STATUS", "serving m v1", prefix=True)
        deadline = time.monotonic() + 10
        while len(listener.times("WATCHDOG")) < 3:
            assert time.monotonic() < deadline, f"no watchdog pings: {daemon.stderr()}"
            time.sleep(0.02)
        os.unlink(sock)
        index, _ = listener.wait_for("STATUS", "unhealthy: API does not answer", prefix=True)
        assert "No such file or directory" in listener.messages[index][1]["STATUS"]
        stopped_at = listener.messages[index][0]
        # no ping after the unhealthy status (a ping already in flight may land just before)
        time.sleep(0.6)  # three watchdog intervals of 0.2 s with no ping
        assert [t for t in listener.times("WATCHDOG") if t > stopped_at] == []
    finally:
        assert daemon.stop() == 0, daemon.stderr()
