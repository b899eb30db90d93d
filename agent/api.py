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
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from agent import __version__, v2
from agent.config import ApiConfig, listen_address
from agent.errors import (
    BackendError,
    InferdError,
    InputError,
    ModelNotFoundError,
    NotReadyError,
)
from agent.slots import ModelSlot
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


def _make_handler(api: ApiServer) -> type[BaseHTTPRequestHandler]:
    limit = api.config.max_body_bytes

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"inferd/{__version__}"
        sys_version = ""

        def setup(self) -> None:
            super().setup()
            if self.connection.family in (socket.AF_INET, socket.AF_INET6):
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with api._conn_lock:
                api._idle.add(self.connection)

        def handle(self) -> None:
            self.close_connection = True
            self.handle_one_request()
            while not self.close_connection:
                with api._conn_lock:
                    if api._stopping:
                        return
                    api._idle.add(self.connection)
                self.handle_one_request()

        def parse_request(self) -> bool:
            with api._conn_lock:
                api._idle.discard(self.connection)
            return super().parse_request()

        def finish(self) -> None:
            with api._conn_lock:
                api._idle.discard(self.connection)
            with contextlib.suppress(OSError):  # the client went away: nothing to flush to
                super().finish()

        def address_string(self) -> str:
            addr = self.client_address
            return str(addr[0]) if isinstance(addr, tuple) and addr else "unix"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def do_GET(self) -> None:
            self._dispatch(b"")

        def do_POST(self) -> None:
            raw_length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self._reply(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not supported")
                return
            try:
                length = int(raw_length) if raw_length is not None else 0
                if length < 0:
                    raise ValueError
            except ValueError:
                self._reply(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
                return
            if length > limit:
                # Not reading the body: the connection cannot be reused, so close it.
                self.close_connection = True
                self._reply(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"request body of {length} bytes is over the limit of {limit}",
                )
                return
            raw_header = self.headers.get(_HEADER_LENGTH)
            if raw_header is not None and not raw_header.isdigit():
                self._reply(HTTPStatus.BAD_REQUEST, f"invalid {_HEADER_LENGTH}")
                return
            header_length = int(raw_header) if raw_header is not None else None
            self._dispatch(self.rfile.read(length), header_length)

        def _dispatch(self, body: bytes, header_length: int | None = None) -> None:
            api.requests += 1
            try:
                status, payload, ctype = api.handle(self.command, self.path, body, header_length)
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
                log.exception("unexpected error serving %s %s", self.command, self.path)
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {err}")
                return
            self._send(status, payload, ctype)

        def _reply(self, status: HTTPStatus, message: str) -> None:
            if 400 <= status < 500:
                api.bad_requests += 1
            self._send(status, v2.error_body(message), "application/json")

        def _send(self, status: HTTPStatus, payload: bytes, ctype: str | tuple[str, int]) -> None:
            self.send_response(status)
            if isinstance(ctype, tuple):
                ctype, head_len = ctype
                self.send_header(_HEADER_LENGTH, str(head_len))
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            if self.close_connection:
                self.send_header("Connection", "close")
            # One write for head and body: with TCP_NODELAY two writes are two packets.
            self._headers_buffer.append(b"\r\n" + payload)  # type: ignore[attr-defined]
            self.flush_headers()

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
