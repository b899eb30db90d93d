"""Is the serving path healthy? The answer that feeds (or starves) the systemd watchdog.

Two checks, both of things a client would notice: the local API answers a real HTTP request
(its event loop is alive), and no model run has been going for longer than its slot's
``stuck_run_s`` (a wedged runtime would hold requests forever).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping

from agent.api.server import ApiServer
from agent.slots import ModelSlot
from runtime.errors import NotReadyError

_PROBE = "GET /v2/health/live HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
_WILDCARD = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def probe_api(address: tuple[str, int] | str, timeout: float) -> str | None:
    """GET /v2/health/live on ``address``; None when the server answers, else what went wrong."""
    try:
        if isinstance(address, str):
            host_header = "localhost"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
        else:
            host, port = address
            target = _WILDCARD.get(host, host)
            # The API refuses a Host that does not name it (DNS rebinding): name it exactly.
            host_header = f"[{target}]:{port}" if ":" in target else f"{target}:{port}"
            sock = socket.create_connection((target, port), timeout)
        with sock:
            sock.sendall(_PROBE.format(host=host_header).encode("latin-1"))
            head = b""
            while b"\r\n" not in head and len(head) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                head += chunk
    except OSError as err:
        return f"API does not answer: {err.strerror or err}"
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    # 503 here is the connection cap (the live route itself always answers 200): the event loop
    # answered, so the server is alive; a restart would not make a flooding client go away.
    if status.split(" ")[1:2] not in (["200"], ["503"]):
        return f"API health check got {status or 'no reply'!r}"
    return None


class ServingHealth:
    """The daemon's health callable for :class:`~agent.sdnotify.WatchdogPinger`; its status line."""

    def __init__(
        self, api: ApiServer, slots: Mapping[str, ModelSlot], probe_timeout_s: float = 5.0
    ) -> None:
        self.api = api
        self.slots = slots
        self.probe_timeout_s = probe_timeout_s

    def stuck_run(self) -> str | None:
        """The first slot whose current backend has a run older than its ``stuck_run_s``."""
        now = time.perf_counter_ns()
        for slot in self.slots.values():
            try:
                backend = slot.current.backend
            except NotReadyError:
                continue
            started = backend.oldest_run_start_ns()
            if started is not None and now - started > slot.config.stuck_run_s * 1e9:
                return f"model {slot.name}: a run has been going for {(now - started) / 1e9:.0f} s"
        return None

    def problem(self) -> str | None:
        """None while the serving path is healthy, otherwise one line saying what is wrong."""
        return self.stuck_run() or probe_api(self.api.address, self.probe_timeout_s)

    def summary(self) -> str:
        """A short line for ``systemctl status``: models, versions and where the API listens."""
        parts = []
        for slot in self.slots.values():
            try:
                parts.append(f"{slot.name} v{slot.current.version}")
            except NotReadyError:
                parts.append(f"{slot.name} (not loaded)")
        address = self.api.address
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        return f"serving {', '.join(parts) or 'no models'} on {where}"
