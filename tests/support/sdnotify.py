"""What systemd's side of the notify protocol sees: a real AF_UNIX datagram socket.

A :class:`NotifyListener` binds one (the ``notify_socket`` fixture: in a short temporary
directory, socket paths are limited to 108 bytes) and records every datagram; tests point
``NOTIFY_SOCKET`` at it.
"""

from __future__ import annotations

import socket
import threading
import time

Message = dict[str, str]


class NotifyListener:
    """Receives sd_notify datagrams in a thread and keeps them, parsed, in arrival order."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, Message]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="notify-listener", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def wait_for(
        self,
        key: str,
        value: str = "1",
        timeout: float = 20.0,
        after: int = 0,
        prefix: bool = False,
    ) -> tuple[int, Message]:
        """The first message from index ``after`` on with ``key=value`` (or a value starting
        with ``value`` when ``prefix``); returns (index, message)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.messages)):
                    got = self.messages[i][1].get(key)
                    if got is not None and (got.startswith(value) if prefix else got == value):
                        return i, self.messages[i][1]
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [m for _, m in self.messages]
                    raise AssertionError(f"no {key}={value} within {timeout}s; got {seen}")
                self._cond.wait(left)

    def times(self, key: str, value: str = "1") -> list[float]:
        """Arrival times (monotonic) of every message with ``key=value``."""
        with self._cond:
            return [t for t, m in self.messages if m.get(key) == value]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
