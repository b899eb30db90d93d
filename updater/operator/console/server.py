"""The console's HTTP side: the page, its static files, the state as JSON, a server-sent event
stream and the halt and resume buttons.

The standard library's ``ThreadingHTTPServer`` (the operator package may not import the
agent's llhttp server: the import contracts keep operator code off ``agent``), with the limits a
page for one operator needs: a connection cap (503 over it), a socket timeout on every read and
write, 4 KiB request bodies, a cap on event streams. Security follows the agent's API: loopback
by default; anywhere else only with a bearer token (``Authorization: Bearer`` for scripts, or a
``SameSite=Strict`` cookie the login form sets for the browser, since ``EventSource`` cannot send
headers) compared with :func:`hmac.compare_digest`; without a token the ``Host`` must name the
loopback address (no DNS rebinding), and a POST must be JSON from the page's own origin.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Protocol

from runtime.addresses import is_loopback, read_token_file
from runtime.errors import InferdError, OperatorError

log = logging.getLogger(__name__)

COOKIE = "inferd_console_token"
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "login.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}
HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
_ROLLOUT = re.compile(r"^/api/rollouts/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/(halt|resume)$")


class ConsoleAuthError(InferdError):
    """The console's listen address or token file is unusable."""


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int = 64
    max_streams: int = 16
    """Open event streams (each holds a connection and a thread)."""
    timeout_s: float = 15.0
    """Socket timeout: a client that sends or reads nothing for this long is dropped."""
    max_body_bytes: int = 4096
    stream_min_interval_s: float = 0.5
    """An event stream sends at most this often, however busy the broker."""
    refresh_s: float = 5.0
    """An event stream sends the state at least this often (rollout soak countdowns move)."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) -> (host, port); ConsoleAuthError when malformed."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConsoleAuthError(f"--listen {listen}: expected HOST:PORT, e.g. 127.0.0.1:8090")
    return host, int(port)


def read_token(path: str | None, listen: str, insecure: bool = False) -> bytes | None:
    """The bearer token, with the agent's rules: required off loopback (unless ``insecure``),
    at least 16 printable characters without spaces."""
    host, _ = parse_listen(listen)
    if path is None:
        if not is_loopback(host) and not insecure:
            raise ConsoleAuthError(
                f"--listen {listen} is reachable from other hosts: give --token-file (clients "
                "send Authorization: Bearer <token>) or --insecure"
            )
        return None
    return read_token_file(path, "--token-file", ConsoleAuthError)


def load_static() -> dict[str, bytes]:
    """The page's files, read once from the package data."""
    base = resources.files(__package__).joinpath("static")
    return {name: base.joinpath(name).read_bytes() for name in STATIC}


class Console(Protocol):
    """What the server asks of the application (see :class:`~.app.ConsoleApp`)."""

    def snapshot_json(self) -> bytes: ...
    def wait(self, generation: int, timeout: float) -> int: ...
    def halt(self, slot: str) -> str: ...
    def resume(self, slot: str) -> str: ...
    def wake(self) -> None: ...


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], console: ConsoleServer) -> None:
        self.console = console
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.slots = threading.BoundedSemaphore(console.limits.max_connections)
        self.open: set[socket.socket] = set()
        self.open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\nRetry-After: 1\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self.open_lock:
            self.open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.open_lock:
                self.open.discard(request)
            self.slots.release()

    def close_all(self) -> None:
        """End every open connection (idle keep-alive ones too) so no handler thread lingers."""
        with self.open_lock:
            conns = list(self.open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("console: connection from %s ended with an error", client_address, exc_info=True)


class ConsoleServer:
    """Serves ``console`` on ``listen`` from a named thread; :meth:`stop` ends every stream."""

    def __init__(
        self,
        console: Console,
        listen: str,
        token: bytes | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        self.console = console
        self.limits = limits or ServerLimits()
        self.token = token
        self.static = load_static()
        host, port = parse_listen(listen)
        self.stopping = threading.Event()
        self.streams = threading.BoundedSemaphore(self.limits.max_streams)
        try:
            self.httpd = _Server((host, port), self)
        except OSError as err:
            raise ConsoleAuthError(f"--listen {listen}: cannot listen: {err.strerror}") from err
        self.host = host
        self.port = self.httpd.server_address[1]
        self.loopback = is_loopback(host)
        names = {f"{host}:{self.port}", f"[{host}]:{self.port}"}
        if self.loopback:
            names |= {f"localhost:{self.port}", f"127.0.0.1:{self.port}", f"[::1]:{self.port}"}
        self.hosts = names
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="console-http"
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop accepting, end the event streams and close every connection."""
        self.stopping.set()
        self.console.wake()  # event streams waiting for a change see the stop at once
        if self.thread.is_alive():
            self.httpd.shutdown()  # waits for serve_forever: only when it runs
        self.httpd.server_close()
        self.httpd.close_all()
        if self.thread.is_alive():
            self.thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "inferd-console"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        self.request.settimeout(self.server.console.limits.timeout_s)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("console http: " + format, *args)

    # -- replies ----------------------------------------------------------------------------

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        ctype: str = "application/json",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (*HEADERS, *headers):
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, data: Any, **kw: Any) -> None:
        self._send(status, json.dumps(data, separators=(",", ":")).encode(), **kw)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"error": message})

    # -- checks -----------------------------------------------------------------------------

    def _host_ok(self) -> bool:
        srv = self.server.console
        if srv.token is not None and not srv.loopback:
            return True  # the token is the guard; the name a remote browser used is not ours
        return self.headers.get("Host", "").lower() in srv.hosts

    def _authorized(self) -> bool:
        token = self.server.console.token
        if token is None:
            return True
        scheme, _, credential = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._same(credential.strip(), token):
            return True
        try:
            jar = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            return False
        morsel = jar.get(COOKIE)
        return morsel is not None and self._same(morsel.value, token)

    @staticmethod
    def _same(given: str, token: bytes) -> bool:
        try:
            return hmac.compare_digest(given.encode("ascii"), token)
        except UnicodeEncodeError:
            return False

    def _guard(self) -> bool:
        """Host check; False after answering when the request must go no further."""
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN, "the Host header does not name this console")
            return False
        return True

    def _read_json(self) -> Any:
        """The POST body as JSON; None after answering an error."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._error(HTTPStatus.NOT_IMPLEMENTED, "chunked request bodies are not accepted")
            return None
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json")
            return None
        origin = self.headers.get("Origin")
        if (
            origin is not None
            and origin.lower() != f"http://{self.headers.get('Host', '')}".lower()
        ):
            self._error(HTTPStatus.FORBIDDEN, f"origin {origin!r} is not this console")
            return None
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required")
            return None
        if int(length) > self.server.console.limits.max_body_bytes:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the body is too large")
            self.close_connection = True
            return None
        raw = self.rfile.read(int(length)) if int(length) else b"{}"
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "the body is not JSON")
            return None

    # -- routes -----------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        if self.path.split("?", 1)[0] == "/api/stream":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "the event stream needs GET")
            return
        self.do_GET()

    def do_GET(self) -> None:
        if not self._guard():
            return
        path = self.path.split("?", 1)[0]
        srv = self.server.console
        if path == "/healthz":
            self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
            return
        if path in ("/", "/index.html"):
            page = "index.html" if self._authorized() else "login.html"
            self._send(HTTPStatus.OK, srv.static[page], STATIC[page])
            return
        if path.startswith("/static/"):
            name = path[len("/static/") :]
            if name in STATIC and name not in ("index.html", "login.html"):
                self._send(HTTPStatus.OK, srv.static[name], STATIC[name])
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such file: {path}")
            return
        if not self._authorized():
            self._error(HTTPStatus.UNAUTHORIZED, "this console needs its token")
            return
        if path == "/api/state":
            self._send(HTTPStatus.OK, srv.console.snapshot_json())
        elif path == "/api/stream":
            self._stream()
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {path}")

    def do_POST(self) -> None:
        if not self._guard():
            return
        path = self.path.split("?", 1)[0]
        body = self._read_json()
        if body is None:
            return
        if path == "/api/login":
            self._login(body)
            return
        if not self._authorized():
            self._error(HTTPStatus.UNAUTHORIZED, "this console needs its token")
            return
        m = _ROLLOUT.match(path)
        if m is None:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}")
            return
        slot, action = m.groups()
        console = self.server.console.console
        try:
            message = console.halt(slot) if action == "halt" else console.resume(slot)
        except OperatorError as err:
            self._error(HTTPStatus.CONFLICT, str(err))
            return
        except InferdError as err:
            self._error(HTTPStatus.BAD_GATEWAY, str(err))
            return
        self._json(HTTPStatus.OK, {"ok": True, "message": message})

    def _login(self, body: Any) -> None:
        token = self.server.console.token
        given = body.get("token") if isinstance(body, dict) else None
        if token is None:
            self._json(HTTPStatus.OK, {"ok": True})
            return
        if not isinstance(given, str) or not self._same(given, token):
            time.sleep(0.5)  # a guesser pays for each try
            self._error(HTTPStatus.UNAUTHORIZED, "wrong token")
            return
        cookie = f"{COOKIE}={given}; HttpOnly; SameSite=Strict; Path=/"
        self._json(HTTPStatus.OK, {"ok": True}, headers=(("Set-Cookie", cookie),))

    def _stream(self) -> None:
        srv = self.server.console
        if not srv.streams.acquire(blocking=False):
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "too many open event streams")
            return
        self.close_connection = True
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            for name, value in HEADERS:
                self.send_header(name, value)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n")
            generation = -1
            last_sent = 0.0
            while not srv.stopping.is_set():
                wait = max(0.0, srv.limits.stream_min_interval_s - (time.monotonic() - last_sent))
                if srv.stopping.wait(wait):
                    break
                generation = srv.console.wait(generation, srv.limits.refresh_s)
                if srv.stopping.is_set():
                    break
                data = srv.console.snapshot_json()
                self.wfile.write(b"event: state\ndata: " + data + b"\n\n")
                self.wfile.flush()
                last_sent = time.monotonic()
        except OSError:
            pass  # the browser went away
        finally:
            srv.streams.release()


def serve(
    console: Console, listen: str, token: bytes | None, limits: ServerLimits | None = None
) -> ConsoleServer:
    """A started :class:`ConsoleServer`."""
    server = ConsoleServer(console, listen, token, limits)
    server.start()
    return server
