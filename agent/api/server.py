"""The local inference API: KServe Open Inference Protocol v2 over HTTP/1.1 keep-alive.

One thread per connection (``ThreadingMixIn``), so a slow inference never blocks a health check
on another connection. TCP_NODELAY is set on every accepted socket: responses are small and
Nagle's algorithm would add tens of milliseconds to each keep-alive exchange.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

from agent import __version__
from agent.api import v2
from agent.config import ApiConfig, listen_address
from agent.slots import ModelSlot
from runtime.errors import BackendError, InferdError, InputError, ModelNotFoundError, NotReadyError
from telemetry.prometheus import CONTENT_TYPE, Family, render

log = logging.getLogger(__name__)

FeedbackHandler = Callable[[str, bytes], Mapping[str, Any]]
"""(model name, request body) -> JSON-able reply; raises InputError on a bad body."""
MetricsText = Callable[[], str]
"""Extra Prometheus exposition text appended to /metrics."""

_HEADER_LENGTH = "Inference-Header-Content-Length"
_MODEL_PATH = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/infer|/ready|/feedback)?$"
)


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiServer:
    """Serves the v2 API for a set of model slots on TCP or a unix socket."""

    def __init__(self, config: ApiConfig, slots: Mapping[str, ModelSlot]) -> None:
        self.config = config
        self.slots = slots
        self.feedback: FeedbackHandler | None = None
        self.metrics_text: list[MetricsText] = []
        self.live = True
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None
        self.requests = 0
        self.bad_requests = 0
        # Connections waiting for their next request; the rest are mid-request.
        self._idle: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._stopping = False

    @property
    def address(self) -> tuple[str, int] | str:
        """Where the server listens (the real port when 0 was configured)."""
        if self._server is None:
            return listen_address(self.config.listen)
        addr: Any = self._server.server_address
        return addr if isinstance(addr, str) else (addr[0], addr[1])

    def start(self) -> None:
        """Bind and serve in a background thread."""
        where = listen_address(self.config.listen)
        handler = _make_handler(self)
        try:
            if isinstance(where, str):
                Path(where).parent.mkdir(parents=True, exist_ok=True)
                if os.path.exists(where):
                    os.unlink(where)
                server: socketserver.BaseServer = _UnixServer(where, handler)
                os.chmod(where, 0o660)
            else:
                family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
                server = _make_tcp_server(family)(where, handler)
        except OSError as err:
            raise InferdError(
                f"api.listen {self.config.listen}: cannot listen: {err.strerror}"
            ) from err
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="api", daemon=True
        )
        self._thread.start()
        log.info(
            "API listening on %s",
            self.config.listen
            if isinstance(where, str)
            else f"http://{self.address[0]}:{self.address[1]}",
        )

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, join the serving threads."""
        if self._server is None:
            return
        self._server.shutdown()
        # Idle keep-alive connections would block the join below: end their reading side.
        # A connection in the middle of a request finishes it, then sees the flag and closes.
        with self._conn_lock:
            self._stopping = True
            for conn in self._idle:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)
        self._server.server_close()  # ThreadingMixIn joins the request threads here
        if self._thread is not None:
            self._thread.join()
        where: Any = self._server.server_address
        if isinstance(where, str) and os.path.exists(where):
            os.unlink(where)
        self._server = None

    # -- request handling (called from the connection threads) ----------------------------

    def slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            raise ModelNotFoundError(f"model {name!r} not found; serving {', '.join(self.slots)}")
        return slot

    def handle(
        self, method: str, path: str, body: bytes, header_length: int | None = None
    ) -> tuple[HTTPStatus, bytes, str | tuple[str, int]]:
        """Route one request; returns (status, body, content type).

        The content type is (type, JSON header length) for a binary-extension response.
        """
        path = path.split("?", 1)[0]
        if method == "GET":
            if path == "/v2/health/live":
                return self._json(HTTPStatus.OK, {"live": self.live})
            if path == "/v2/health/ready":
                ready = all(s.ready for s in self.slots.values())
                status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
                return self._json(status, {"ready": ready})
            if path == "/v2":
                return self._json(
                    HTTPStatus.OK, {"name": "inferd", "version": __version__, "extensions": []}
                )
            if path == "/metrics":
                return HTTPStatus.OK, self.prometheus().encode(), CONTENT_TYPE
        m = _MODEL_PATH.match(path)
        if m is None:
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {method} {path}")
        slot = self.slot(m["name"])
        rest = m["rest"]
        if rest == "/feedback" and method == "POST":
            if self.feedback is None:
                raise _HttpError(HTTPStatus.NOT_IMPLEMENTED, "quality monitoring is not enabled")
            return self._json(HTTPStatus.OK, self.feedback(slot.name, body))
        model = slot.current  # NotReadyError -> 503
        if m["version"] is not None and m["version"] != model.version:
            raise ModelNotFoundError(
                f"model {slot.name!r} has no version {m['version']!r}; serving {model.version!r}"
            )
        if rest == "/infer" and method == "POST":
            return self._infer(slot, body, header_length)
        if method == "GET" and rest == "/ready":
            return self._json(HTTPStatus.OK, {"name": slot.name, "ready": True})
        if method == "GET" and rest is None:
            meta = v2.model_metadata(slot.name, model.version, slot.config.runtime, model.backend)
            return self._json(HTTPStatus.OK, meta)
        raise _HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on {path}")

    def _infer(
        self, slot: ModelSlot, body: bytes, header_length: int | None
    ) -> tuple[HTTPStatus, bytes, str | tuple[str, int]]:
        out, head_len = v2.infer(slot, body, header_length)
        if head_len is None:
            return HTTPStatus.OK, out, "application/json"
        return HTTPStatus.OK, out, ("application/octet-stream", head_len)

    @staticmethod
    def _json(status: HTTPStatus, obj: Any) -> tuple[HTTPStatus, bytes, str | tuple[str, int]]:
        return status, v2.encode(obj), "application/json"

    def prometheus(self) -> str:
        """Prometheus text exposition of per-model counters and the API's own."""
        ready = Family("inferd_model_ready", "gauge", "Whether the model slot serves.")
        runs = Family("inferd_inference_requests_total", "counter", "Model runs.")
        errors = Family("inferd_inference_errors_total", "counter", "Failed model runs.")
        seconds = Family("inferd_inference_seconds_sum", "counter", "Time spent in model runs.")
        for slot in self.slots.values():
            if not slot.ready:
                ready.add(0, model=slot.name)
                continue
            model = slot.current
            st = model.backend.stats
            ready.add(1, model=slot.name, version=model.version)
            runs.add(st.runs, model=slot.name, version=model.version)
            errors.add(st.errors, model=slot.name, version=model.version)
            seconds.add(f"{st.total_ns / 1e9:.9f}", model=slot.name, version=model.version)
        http = Family("inferd_http_requests_total", "counter", "HTTP requests.")
        http.add(self.requests)
        bad = Family("inferd_http_bad_requests_total", "counter", "HTTP 4xx replies.")
        bad.add(self.bad_requests)
        out = render([ready, runs, errors, seconds, http, bad])
        for extra in self.metrics_text:
            out += extra()
        return out


_ERROR_STATUS: tuple[tuple[type[Exception], HTTPStatus], ...] = (
    (InputError, HTTPStatus.BAD_REQUEST),
    (ModelNotFoundError, HTTPStatus.NOT_FOUND),
    (NotReadyError, HTTPStatus.SERVICE_UNAVAILABLE),
    (BackendError, HTTPStatus.INTERNAL_SERVER_ERROR),
)


_MAX_LINE = 65536
_MAX_HEADERS = 100


def _make_handler(api: ApiServer) -> type[socketserver.StreamRequestHandler]:
    limit = api.config.max_body_bytes
    server_header = f"Server: inferd/{__version__}\r\n".encode()

    class Handler(socketserver.StreamRequestHandler):
        """HTTP/1.1 with keep-alive, parsed by hand: the stdlib's BaseHTTPRequestHandler runs
        every request's headers through the email package, and with its response
        bookkeeping that was most of the API's overhead on small models."""

        close_connection = True
        method = ""
        path = ""

        def setup(self) -> None:
            super().setup()
            if self.connection.family in (socket.AF_INET, socket.AF_INET6):
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with api._conn_lock:
                api._idle.add(self.connection)

        def handle(self) -> None:
            self.close_connection = False
            while not self.close_connection:
                with api._conn_lock:
                    if api._stopping:
                        return
                    api._idle.add(self.connection)
                try:
                    self._one_request()
                except (ConnectionError, TimeoutError):
                    return

        def finish(self) -> None:
            with api._conn_lock:
                api._idle.discard(self.connection)
            with contextlib.suppress(OSError):  # the client went away: nothing to flush to
                super().finish()

        def _one_request(self) -> None:
            line = self.rfile.readline(_MAX_LINE + 1)
            if not line:
                self.close_connection = True
                return
            with api._conn_lock:
                api._idle.discard(self.connection)
            if len(line) > _MAX_LINE:
                self._fatal(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
                return
            parts = line.decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                self._fatal(HTTPStatus.BAD_REQUEST, "malformed request line")
                return
            self.method, self.path, version = parts
            headers: dict[str, str] = {}
            for _ in range(_MAX_HEADERS):
                raw = self.rfile.readline(_MAX_LINE + 1)
                if raw in (b"\r\n", b"\n", b""):
                    break
                name, sep, value = raw.decode("latin-1").partition(":")
                if not sep or len(raw) > _MAX_LINE:
                    self._fatal(HTTPStatus.BAD_REQUEST, "malformed header line")
                    return
                headers[name.strip().lower()] = value.strip()
            else:
                self._fatal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
                return
            connection = headers.get("connection", "").lower()
            if version == "HTTP/1.0":
                self.close_connection = connection != "keep-alive"
            else:
                self.close_connection = connection == "close"
            if self.method == "GET":
                self._dispatch(b"")
            elif self.method == "POST":
                self._post(headers)
            else:
                self._reply(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.method} is not supported")

        def _fatal(self, status: HTTPStatus, message: str) -> None:
            self.close_connection = True
            self._reply(status, message)

        def _post(self, headers: dict[str, str]) -> None:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                self._fatal(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not supported")
                return
            raw_length = headers.get("content-length", "0")
            if not raw_length.isdigit():
                self._fatal(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
                return
            length = int(raw_length)
            if length > limit:
                # Not reading the body: the connection cannot be reused, so close it.
                self._fatal(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"request body of {length} bytes is over the limit of {limit}",
                )
                return
            if headers.get("expect", "").lower() == "100-continue":
                # curl asks this for bodies over 1 KiB and otherwise waits a second for it
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = self.rfile.read(length)
            if len(body) < length:
                self.close_connection = True
                return  # the client went away mid-body
            raw_header = headers.get(_HEADER_LENGTH.lower())
            if raw_header is not None and not raw_header.isdigit():
                self._reply(HTTPStatus.BAD_REQUEST, f"invalid {_HEADER_LENGTH}")
                return
            self._dispatch(body, int(raw_header) if raw_header is not None else None)

        def _dispatch(self, body: bytes, header_length: int | None = None) -> None:
            api.requests += 1
            try:
                status, payload, ctype = api.handle(self.method, self.path, body, header_length)
            except _HttpError as err:
                self._reply(err.status, str(err))
                return
            except InferdError as err:
                status = next(
                    (st for cls, st in _ERROR_STATUS if isinstance(err, cls)),
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                )
                self._reply(status, str(err))
                return
            except Exception as err:
                log.exception("unexpected error serving %s %s", self.method, self.path)
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {err}")
                return
            self._send(status, payload, ctype)

        def _reply(self, status: HTTPStatus, message: str) -> None:
            if 400 <= status < 500:
                api.bad_requests += 1
            self._send(status, v2.error_body(message), "application/json")

        def _send(self, status: HTTPStatus, payload: bytes, ctype: str | tuple[str, int]) -> None:
            extra = ""
            if isinstance(ctype, tuple):
                ctype, head_len = ctype
                extra = f"{_HEADER_LENGTH}: {head_len}\r\n"
            if self.close_connection:
                extra += "Connection: close\r\n"
            head = (
                f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n{extra}"
            )
            # One write for head and body: with TCP_NODELAY two writes are two packets.
            self.wfile.write(head.encode("latin-1") + server_header + b"\r\n" + payload)
            log.debug("%s %s -> %d", self.method, self.path, status.value)

    return Handler


def _make_tcp_server(family: int) -> type[socketserver.TCPServer]:
    class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
        address_family = family
        allow_reuse_address = True
        daemon_threads = False
        block_on_close = True

    return Server


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = False
    block_on_close = True
