"""The systemd notification protocol, in-process (no libsystemd).

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) to a
``Type=notify`` service; the service sends newline-separated ``KEY=VALUE`` datagrams to it:
``READY=1`` once it serves, ``STATUS=`` a line for ``systemctl status``, ``WATCHDOG=1`` as a
keep-alive when ``WatchdogSec=`` is set, ``RELOADING=1`` / ``STOPPING=1`` around reloads and
shutdown. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

HealthCheck = Callable[[], str | None]
"""Returns None while the serving path is healthy, otherwise one line saying what is wrong."""


def socket_address(value: str) -> str | bytes | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value; None when it is not an AF_UNIX one."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: a leading NUL byte instead of '@', no terminating NUL.
        return b"\0" + value[1:].encode()
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds when systemd asks this process for pings, else None."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # meant for another process (we were started by a child of the service)
    return int(usec) / 1_000_000


class Notifier:
    """Sends state changes to systemd; silent and cheap when not run by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = socket_address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET %r is not an AF_UNIX socket; not notifying systemd", raw)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False
        self.watchdog_s = watchdog_interval(env) if self._address is not None else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` fields; False when it could not be delivered."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._sock.sendto(message, self._address)
            except OSError as err:
                if not self._failed:  # one warning, not one per watchdog tick
                    log.warning("cannot notify systemd: %s", err.strerror or err)
                self._failed = True
                return False
        if self._failed:
            log.info("notifying systemd works again")
            self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """The service is up (sent once at start and after each reload)."""
        return self.send("READY=1", *_status(status))

    def status(self, status: str) -> bool:
        """Update the free-form line shown by ``systemctl status``."""
        return self.send(*_status(status))

    def watchdog(self) -> bool:
        """Keep-alive: the service is healthy now."""
        return self.send("WATCHDOG=1")

    def reloading(self, status: str | None = None) -> bool:
        """A config reload starts; systemd >= 253 wants the CLOCK_MONOTONIC time with it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        return self.send("STOPPING=1", *_status(status))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status(status: str | None) -> tuple[str, ...]:
    if status is None:
        return ()
    return ("STATUS=" + " ".join(status.split()),)  # one line: a newline would end the field


class WatchdogPinger:
    """Sends ``WATCHDOG=1`` every half watchdog interval, but only while ``health`` says so.

    A wedged backend or a dead API makes ``health`` return a reason; the pings stop, and systemd
    kills and restarts the service once ``WatchdogSec=`` has passed without one. ``status``,
    when given, is re-sent as ``STATUS=`` whenever its line changes (e.g. after a model swap).
    """

    def __init__(
        self,
        notifier: Notifier,
        health: HealthCheck,
        status: Callable[[], str] | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.notifier = notifier
        self.health = health
        self.status = status
        timeout = notifier.watchdog_s
        self.interval_s = interval_s if interval_s is not None else (timeout or 0.0) / 2
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_status: str | None = None
        self._problem: str | None = None

    def start(self) -> None:
        """Start pinging (no thread when systemd did not ask for a watchdog)."""
        if not self.notifier.enabled or self.interval_s <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="inferd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def tick(self) -> bool:
        """Check health once; ping when healthy. Returns whether a ping was sent."""
        try:
            problem = self.health()
        except Exception as err:  # noqa: BLE001 - a failing check is unhealthy, not fatal
            problem = f"health check failed: {err}"
        if problem != self._problem:
            if problem is None:
                log.info("serving path healthy again; feeding the systemd watchdog")
            else:
                log.error("serving path unhealthy, not feeding the systemd watchdog: %s", problem)
            self._problem = problem
        line = f"unhealthy: {problem}" if problem is not None else None
        if line is None and self.status is not None:
            line = self.status()
        if line is not None and line != self._last_status:
            self._last_status = line
            self.notifier.status(line)
        return problem is None and self.notifier.watchdog()

    def _loop(self) -> None:
        self.tick()
        while not self._stop.wait(self.interval_s):
            self.tick()
