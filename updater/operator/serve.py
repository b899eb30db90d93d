"""A static HTTP server for a repository's public folder (demos and tests; production uses any
static server, S3 or a CDN: devices only need plain GETs of ``metadata/`` and ``targets/``)."""

from __future__ import annotations

import functools
import logging
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    # A poked fleet connects all at once: with http.server's backlog of 5 the kernel drops
    # the other connection attempts and each costs its device a 1 s SYN retransmit.
    request_queue_size = 256
    daemon_threads = True


class RepositoryServer:
    """Serve ``directory`` on ``host:port`` (port 0 picks a free one) from a named thread."""

    def __init__(
        self,
        directory: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        handler: type[SimpleHTTPRequestHandler] = _Handler,
    ) -> None:
        """``handler``: another request handler over ``directory`` (tests inject faults)."""
        self.httpd = _Server((host, port), functools.partial(handler, directory=str(directory)))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def start(self) -> RepositoryServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="inferd-repo-serve", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
