"""Loopback ports for servers a test or a benchmark starts, the wait until they answer, and
their end (by their own pid only)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 5.0) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; TimeoutError if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def wait_serving(
    proc: subprocess.Popen[Any],
    ready: Callable[[], bool],
    what: str,
    timeout: float,
    output: Callable[[], str] = str,
    interval: float = 0.1,
) -> None:
    """Poll ``ready`` (an OSError counts as not yet) until it is true; AssertionError naming
    ``what``, with ``output()`` (the server's log), once ``proc`` exits or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}: {output()}")
        try:
            if ready():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout:g} s: {output()}")
        time.sleep(interval)


def end_process(
    proc: subprocess.Popen[Any], sig: signal.Signals = signal.SIGTERM, grace: float = 5.0
) -> None:
    """Send ``sig`` to ``proc`` unless it has exited, and wait; SIGKILL after ``grace`` s."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
