"""HTTP/1.1 connections for the local API: llhttp parses, this module keeps the protocol state.

llhttp (through httptools, the parser Node.js uses) reads the bytes: request line, header
syntax, Content-Length digits, chunked framing, versions. What is left here is what a parser
cannot know (the pattern of uvicorn's ``httptools_impl``): keep-alive and pipelining, the limits
and timeouts, which framings to refuse, and handing a finished request to the application.

Threads: one I/O thread watches every connection that waits for bytes (a selector, so an idle or
slow client costs a few kilobytes and no thread: with a thread per connection, 60 silent sockets
exhausted a ``TasksMax`` and the watchdog's own health check could no longer connect). A
connection with a complete request goes to one of ``api.workers`` worker threads, the bound on
requests running at once. The worker answers it, then keeps the connection for up to
``HOLD_S`` in case the client sends its next request at once, as keep-alive clients do: that
request then costs no thread hand-off, which is what keeps a small request's latency at the
level of a thread per connection (two hand-offs cost about 80 us here). A worker never waits on
a slow client longer than that, or ``REST_S`` for the rest of a request it has begun to read:
then the connection goes back to the I/O thread. Health checks are answered on the I/O thread,
so a liveness probe never queues behind inferences.

A connection is owned by one thread at a time (the I/O thread or one worker), so its state needs
no lock. Requests pipelined behind another wait parsed, in order, and each gets exactly one
response. A refused request gets its error response with ``Connection: close`` and the
connection stops parsing: bytes after a framing error are never read as another request.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import queue
import re
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol

import httptools
import msgspec

log = logging.getLogger(__name__)

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
"""RFC 9110's methods: another method is 501 (not implemented), one of these 405 or 404."""
_METHODS = {m.encode(): m for m in KNOWN_METHODS}
_BODYLESS = frozenset({"GET", "HEAD"})
_SINGLE = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "authorization",
        "origin",
        "expect",
        "inference-header-content-length",
    }
)
"""Headers that may appear once: two Host or Content-Length headers are how requests get
smuggled past a proxy that reads the other one."""
_NAMES: dict[bytes, str] = {}
"""Header names as sent -> lower-case str: a keep-alive client sends the same few names."""
_REQUEST_LINE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+ \S+ HTTP/\d\.\d\r?$")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_LINES = {status: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus}
"""Each status line, made once: an enum's ``value`` and ``phrase`` cost 0.2 us each to read."""
_READ_SIZE = 64 * 1024
"""Bytes per recv: a larger buffer (glibc mmaps from 128 KiB) costs two syscalls each read."""
_LINGER_BYTES = 1 << 20
HOLD_S = 0.002
"""How long a worker waits for a keep-alive client's next request before handing the connection
back to the I/O thread (a client that sends its next request at once does so well within it)."""
REST_S = 0.02
"""How long a worker waits for the rest of a request it has begun to read."""


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The connection limits and timeouts (seconds) of one server."""

    max_connections: int = 128
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body_bytes: int = 16 << 20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    """From the end of the header to the end of the body; also how long a response may wait
    for a client that does not read it."""
    idle_timeout_s: float = 10.0
    drain_timeout_s: float = 5.0
    """How long ``stop()`` lets running requests finish before it cuts them."""
    linger_s: float = 1.0
    """After a final response, how long to read and drop what the client still sends."""
    busy_poll_s: float = 0.0
    """How long a worker that has answered a request checks, without sleeping, for the next one
    of a client that sends at once (0: it sleeps in poll at once); see ``HttpServer._spin``."""


class Request:
    """One parsed request. Header names are lower case; repeated headers are joined by ", "."""

    __slots__ = (
        "body",
        "context",
        "headers",
        "keep_alive",
        "later",
        "method",
        "path",
        "target",
        "version",
    )

    def __init__(
        self, method: str, target: str, version: str, headers: dict[str, str], keep_alive: bool
    ) -> None:
        self.method = method
        self.target = target
        self.path = target.split("?", 1)[0]
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = b""
        self.context: object = None
        """The application's note on the request (its route), set in ``check``."""
        self.later: list[Callable[[], None]] = []
        """Jobs run once the response is sent (whatever it is): bookkeeping a client need not
        wait for."""


class Response:
    """A complete response; ``headers`` are extra fields (names and values we wrote)."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: HTTPStatus,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


class Application(Protocol):
    """What the server asks of the API behind it."""

    def check(self, request: Request) -> Response | None:
        """Called once the head is in (body not read): a Response refuses the request."""

    def inline(self, request: Request) -> bool:
        """Whether to answer on the I/O thread: only for answers that never block."""

    def respond(self, request: Request) -> Response:
        """The answer to a complete request; must not raise."""

    def error(self, status: HTTPStatus, message: str) -> Response:
        """The response for a protocol-level refusal."""


def _tokens(value: str) -> set[str]:
    """A comma-separated header's tokens, lower case (``Connection: keep-alive, Upgrade``)."""
    return {t.strip().lower() for t in value.split(",")}


class _RefusedError(Exception):
    """Raised inside a parser callback; the connection holds the response to send."""


class _Workers:
    """A fixed set of named daemon threads running jobs from one queue."""

    def __init__(self, count: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-worker-{i}", daemon=True)
            for i in range(count)
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def waiting(self) -> bool:
        """Whether jobs wait for a free thread."""
        return not self._jobs.empty()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # the job reports its own errors; this keeps the thread alive
                log.exception("API worker job failed")

    def stop(self, timeout: float) -> list[str]:
        """Ask every thread to end and join them; the names of those still running a job.

        They are daemon threads: one stuck in a model run must not keep the process alive.
        """
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]


_IDLE, _HEAD, _BODY, _LINGER = range(4)


class _Connection:
    """One client connection: its socket, parser callbacks, queued requests and deadline.

    Owned by one thread at a time: the I/O thread while it waits for bytes, a worker while it
    has a request to answer (``in_worker``, switched only on the I/O thread).
    """

    def __init__(self, server: HttpServer, sock: socket.socket) -> None:
        self.server = server
        self.limits = server.limits
        self.app = server.app
        self.sock = sock
        self.parser = httptools.HttpRequestParser(self)
        self.state = _IDLE
        self.last_active = time.monotonic()
        self.deadline = self.last_active + self.limits.idle_timeout_s
        self.out: bytes | memoryview = b""  # response bytes the socket has not taken yet
        self.in_worker = False
        self.registered = 0  # the selector events it is registered for (0: not registered)
        self.closed = False
        self.eof = False
        self.close_after = False  # close once the queued requests are answered
        self.stop_parsing = False
        self.lingered = 0
        self.completed_in_feed = 0
        self.quick = True  # the client sent its last request within busy_poll_s of a reply
        # The request being parsed
        self.url = b""
        self.head_bytes = 0
        self.raw_head_bytes = 0
        self.header_count = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.request: Request | None = None
        self.refusal: Response | None = None  # answer without reading the body
        self.error: Response | None = None  # set before raising _RefusedError
        # Parsed requests and fixed answers (refusals), in order; True: close after it
        self.queue: collections.deque[tuple[Request | None, Response | None, bool]] = (
            collections.deque()
        )

    # -- socket I/O (by the owning thread) -------------------------------------------------

    def recv(self) -> bytes | None:
        """Bytes the client sent; None when there are none yet; b"" at the end."""
        try:
            return self.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:  # reset by the client
            return b""

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self.out:
            self.out = bytes(self.out) + data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self.out = memoryview(data)[sent:]  # a view: flushing a large body copies nothing
            self.deadline = time.monotonic() + self.limits.body_timeout_s

    def flush(self) -> None:
        """Send what the socket would not take before (it is writable again)."""
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            # an empty view still holds the whole response: drop it once everything is sent
            self.out = self.out[sent:] or b""
            self.deadline = time.monotonic() + self.limits.body_timeout_s
        if not self.out and self.state == _LINGER:
            self._shutdown_write()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        self.out = b""  # a closed connection may wait for the cyclic GC: keep no buffers alive
        self.sock.close()

    def _shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    # -- parsing ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse what arrived; complete requests and refusals join the queue."""
        self.last_active = time.monotonic()
        if not data:
            self.eof = True
            self.stop_parsing = True
            return
        if self.state == _LINGER or self.stop_parsing:
            self.lingered += len(data)
            if self.lingered > _LINGER_BYTES:
                self.close()
            return
        self.completed_in_feed = 0
        try:
            self.parser.feed_data(data)
        except _RefusedError:
            pass
        except httptools.HttpParserCallbackError as err:
            if not isinstance(err.__context__, _RefusedError):
                log.error("API connection failed on a request", exc_info=err.__context__)
                self.error = self.app.error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        except httptools.HttpParserUpgrade:
            # The request asking to upgrade is complete and queued; we speak only HTTP/1.1, so
            # it is answered as a plain request and the connection ends after it.
            self.close_after = True
            self.stop_parsing = True
        except httptools.HttpParserError as err:
            self.error = self._parse_error(err, data)
        else:
            if self.state == _HEAD:
                # httptools gathers a header line before calling on_header: count raw bytes
                # too, so one endless header line cannot grow without bound.
                self.raw_head_bytes += len(data)
                if self.raw_head_bytes > 2 * self.limits.max_header_bytes + 65536:
                    self.error = self._head_too_large()
        if self.error is not None:
            self.queue.append((None, self.error, True))
            self.error = None
            self.stop_parsing = True

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.state = _HEAD
        self.deadline = time.monotonic() + self.limits.header_timeout_s
        self.url = b""
        self.head_bytes = 0
        self.raw_head_bytes = 0
        self.header_count = 0
        self.headers = {}
        self.body = []
        self.body_bytes = 0
        self.request = None
        self.refusal = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_header_bytes:
            self._refuse(
                HTTPStatus.REQUEST_URI_TOO_LONG,
                f"request target longer than {self.limits.max_header_bytes} bytes",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        head_bytes = self.head_bytes = self.head_bytes + len(name) + len(value) + 4
        count = self.header_count = self.header_count + 1
        if head_bytes + len(self.url) > limits.max_header_bytes or count > limits.max_headers:
            self.error = self._head_too_large()
            raise _RefusedError
        key = _NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(name) <= 64 and len(_NAMES) < 1024:  # bounded: clients may send any name
                _NAMES[name] = key
        text = value.decode("latin-1").rstrip(" \t")  # llhttp skips the leading whitespace
        headers = self.headers
        if key not in headers:
            headers[key] = text
        elif key in _SINGLE:
            self._refuse(HTTPStatus.BAD_REQUEST, f"duplicate {name.decode('latin-1')} header")
        else:
            headers[key] = f"{headers[key]}, {text}"

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._refuse(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"HTTP/{version} is not supported")
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii", "replace")
        if method not in KNOWN_METHODS:
            self._refuse(HTTPStatus.NOT_IMPLEMENTED, f"method {method} is not implemented")
        headers = self.headers
        te = headers.get("transfer-encoding")
        raw_length = headers.get("content-length")
        has_body = False
        if te is not None:
            if raw_length is not None:
                self._refuse(
                    HTTPStatus.BAD_REQUEST, "Content-Length together with Transfer-Encoding"
                )
            if [c.strip().lower() for c in te.split(",")] != ["chunked"]:
                self._refuse(
                    HTTPStatus.NOT_IMPLEMENTED,
                    f"Transfer-Encoding {te!r} is not supported (only chunked)",
                )
            has_body = True
        elif raw_length is not None:
            if not (raw_length.isascii() and raw_length.isdigit()):
                self._refuse(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
            length = int(raw_length)
            if length > self.limits.max_body_bytes:
                self._refuse(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"request body of {length} bytes is over the limit of"
                    f" {self.limits.max_body_bytes}",
                )
            has_body = length > 0
        if has_body and method in _BODYLESS:
            self._refuse(HTTPStatus.BAD_REQUEST, f"a {method} request must not have a body")
        connection = headers.get("connection")
        if version == "1.1":
            if "host" not in headers:
                self._refuse(HTTPStatus.BAD_REQUEST, "an HTTP/1.1 request needs a Host header")
            keep_alive = connection is None or "close" not in _tokens(connection)
        else:
            keep_alive = connection is not None and "keep-alive" in _tokens(connection)
        request = Request(method, self.url.decode("latin-1"), version, headers, keep_alive)
        refusal = self.app.check(request)
        if refusal is not None:
            if has_body:  # do not read a body we refuse: answer now and close
                self.error = refusal
                raise _RefusedError
            self.refusal = refusal
        elif (
            has_body
            and headers.get("expect", "").lower() == "100-continue"
            and not self.queue
            and not self.out
        ):
            # curl asks this for bodies over 1 KiB and otherwise waits a second for it
            self.send(_CONTINUE)
        self.request = request
        self.state = _BODY
        self.deadline = time.monotonic() + self.limits.body_timeout_s

    def on_body(self, chunk: bytes) -> None:
        self.body_bytes += len(chunk)
        if self.body_bytes > self.limits.max_body_bytes:
            self._refuse(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body is over the limit of {self.limits.max_body_bytes} bytes",
            )
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        request = self.request
        assert request is not None
        request.body = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body = []
        self.queue.append((request, self.refusal, not request.keep_alive))
        self.completed_in_feed += 1
        self.request = None
        self.refusal = None
        self.state = _IDLE
        self.deadline = time.monotonic() + self.limits.idle_timeout_s

    # -- refusals ------------------------------------------------------------------------

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        self.error = self.app.error(status, message)
        raise _RefusedError

    def _head_too_large(self) -> Response:
        return self.app.error(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            f"request header fields over the limit of {self.limits.max_header_bytes} bytes"
            f" or {self.limits.max_headers} fields",
        )

    def _parse_error(self, err: httptools.HttpParserError, data: bytes) -> Response:
        """The status for what llhttp refused, with its reason (a fixed text of llhttp's)."""
        reason = str(err) or type(err).__name__
        if isinstance(err, httptools.HttpParserInvalidMethodError):
            # A well-formed request line with a method llhttp does not know: not implemented.
            # Anything else in its place is not HTTP.
            # (only checked when the line starts the bytes that arrived: llhttp does not say
            # where in them it stopped)
            first = data.split(b"\n", 1)[0]
            if not self.completed_in_feed and not self.url and _REQUEST_LINE.match(first):
                return self.app.error(HTTPStatus.NOT_IMPLEMENTED, "method is not implemented")
            return self.app.error(HTTPStatus.BAD_REQUEST, f"malformed request: {reason}")
        if reason == "Invalid HTTP version":
            return self.app.error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, reason)
        if "Content-Length" in reason:  # bad digits, duplicates, or together with TE
            return self.app.error(HTTPStatus.BAD_REQUEST, f"malformed request: {reason}")
        if "Transfer-Encoding" in reason:
            return self.app.error(
                HTTPStatus.NOT_IMPLEMENTED,
                f"{reason}: only Transfer-Encoding: chunked is supported",
            )
        return self.app.error(HTTPStatus.BAD_REQUEST, f"malformed request: {reason}")

    # -- answering -------------------------------------------------------------------------

    def answer(self, in_worker: bool) -> bool:
        """Answer queued requests in order while the socket takes the output; False when the
        next one has to run on a worker (``in_worker`` False)."""
        while self.queue and not self.out and not self.closed and self.state != _LINGER:
            request, fixed, close = self.queue[0]
            if fixed is None:
                assert request is not None
                if not in_worker and not self.app.inline(request):
                    return False
                self.queue.popleft()
                response = self.app.respond(request)
            else:
                self.queue.popleft()
                response = fixed
            close = close or self.server.stopping
            self.server.count(response.status)
            self.send(
                self.server.encode(
                    response,
                    head_only=request is not None and request.method == "HEAD",
                    close=close,
                    keep_alive_10=not close and request is not None and request.version == "1.0",
                )
            )
            if request is not None and request.later:
                self._run_later(request.later)
            if close:
                self._linger()
        return True

    def _run_later(self, jobs: list[Callable[[], None]]) -> None:
        for job in jobs:
            try:
                job()
            except Exception:  # bookkeeping: the response is out, the connection goes on
                log.exception("API job after a response failed")
        jobs.clear()

    def settle(self, fresh: bool) -> None:
        """Between requests (on the I/O thread): close if asked, else start the right clock.
        ``fresh``: the connection comes back from a worker, so a clock started before the
        request ran starts again."""
        if self.closed or self.queue:
            return
        if self.eof and not self.out:  # the client is done and has all its answers
            self.close()
            return
        if self.state == _LINGER or self.eof:
            return
        if self.close_after:
            self._linger()
            return
        if self.out:
            return
        now = time.monotonic()
        if self.state == _IDLE:
            self.deadline = now + self.limits.idle_timeout_s
        elif fresh:  # a pipelined request half in when its predecessor was handed over
            limits = self.limits
            timeout = limits.header_timeout_s if self.state == _HEAD else limits.body_timeout_s
            self.deadline = now + timeout

    def _linger(self) -> None:
        """Close after a final response: send FIN, then read and drop what the client still
        sends for a moment. Closing with unread bytes would send a reset, which can destroy
        the response before the client reads it."""
        if self.closed or self.state == _LINGER:
            return
        self.state = _LINGER
        self.stop_parsing = True
        self.queue.clear()
        self.deadline = time.monotonic() + self.limits.linger_s
        if not self.out:
            self._shutdown_write()

    @property
    def evictable(self) -> bool:
        """Idle between requests (or closing): a new client may take its place."""
        return (
            not self.in_worker
            and not self.queue
            and not self.out
            and self.state in (_IDLE, _LINGER)
        )

    def expire(self) -> None:
        """The deadline passed (I/O thread): close, with a 408 when a request was half in."""
        if self.closed:
            return
        if self.out or self.state in (_LINGER, _IDLE):
            self.close()  # a client that reads nothing is not waited for
            return
        self.server.timeouts += 1
        what = "header" if self.state == _HEAD else "body"
        self.queue.append(
            (None, self.app.error(HTTPStatus.REQUEST_TIMEOUT, f"request {what} timed out"), True)
        )
        self.stop_parsing = True
        self.answer(in_worker=False)


_ACCEPT = object()
_WAKE = object()


class HttpServer:
    """The I/O thread, the listening socket, the connections and the worker pool."""

    def __init__(
        self, app: Application, limits: Limits, workers: int, server_header: str, name: str
    ) -> None:
        self.app = app
        self.limits = limits
        self.workers = workers
        self.name = name
        self._server_line = f"Server: {server_header}\r\n".encode("latin-1")
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.requests = 0
        self.bad_requests = 0
        self.timeouts = 0
        self.rejected_connections = 0
        self._count_lock = threading.Lock()
        self._date = (-1, b"")
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._pool: _Workers | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._returned: queue.SimpleQueue[_Connection] = queue.SimpleQueue()
        self._spin_lock = threading.Lock()  # held by the one worker busy-polling
        self.busy_poll_hits = 0
        """Busy-polls that found the client's next request (``Limits.busy_poll_s``)."""
        self.busy_poll_misses = 0
        """Busy-polls that ran their whole window for nothing."""
        self._stop_requested = threading.Event()
        self._done = threading.Event()

    # -- lifecycle (any thread) --------------------------------------------------------------

    def start(self, sock: socket.socket) -> None:
        """Serve on a bound socket in a background thread."""
        sock.listen(1024)
        sock.setblocking(False)
        self._listener = sock
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ, _ACCEPT)
        selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._selector = selector
        self._pool = _Workers(self.workers, self.name)
        self._thread = threading.Thread(target=self._run, name=self.name)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, let running requests finish for up to the drain timeout, close
        every connection (idle and half-received ones at once), join the threads."""
        thread = self._thread
        if thread is None:
            return
        self._stop_requested.set()
        self._wake()
        thread.join(self.limits.drain_timeout_s + 2.0)
        if thread.is_alive():
            log.error("API I/O thread did not stop within its drain timeout")
        if self._pool is not None:
            stuck = self._pool.stop(0.5)
            if stuck:
                log.warning("API workers still running a request at exit: %s", ", ".join(stuck))
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._thread = None

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # full: the I/O thread wakes anyway
                self._wake_w.send(b"\0")

    # -- the I/O thread --------------------------------------------------------------------

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        limits = self.limits
        tick = min(
            0.25, limits.idle_timeout_s / 4, limits.header_timeout_s / 4, limits.linger_s / 4
        )
        next_sweep = time.monotonic() + tick
        drain_until = math.inf
        try:
            while True:
                timeout = max(0.0, next_sweep - time.monotonic())
                for key, mask in selector.select(timeout):
                    if key.data is _ACCEPT:
                        self._accept()
                    elif key.data is _WAKE:
                        with contextlib.suppress(OSError):
                            while self._wake_r is not None and self._wake_r.recv(4096):
                                pass
                    else:
                        self._on_event(key.data, mask)
                while True:
                    try:
                        conn = self._returned.get_nowait()
                    except queue.Empty:
                        break
                    conn.in_worker = False
                    self._progress(conn, fresh=True)
                if self._stop_requested.is_set() and not self.stopping:
                    self._begin_stop()
                    drain_until = time.monotonic() + limits.drain_timeout_s
                now = time.monotonic()
                if self.stopping and (not self.connections or now > drain_until):
                    break
                if now >= next_sweep:
                    next_sweep = now + tick
                    for conn in list(self.connections):
                        if not conn.in_worker and conn.deadline < now:
                            conn.expire()
                            self._progress(conn, fresh=False)
        except Exception:
            log.exception("API I/O thread failed")
        finally:
            for conn in list(self.connections):
                if conn.in_worker:  # its worker is still in a model run: release the client
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)
                else:
                    conn.close()
            self.connections.clear()
            if self._listener is not None:
                self._listener.close()
            selector.close()
            self._done.set()

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        for _ in range(64):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # out of file descriptors: the backlog waits
                log.warning("API cannot accept a connection: %s", err.strerror)
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # Responses are one small write; Nagle's algorithm would hold each for an ACK.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock)
            if not self._admit():
                self.rejected_connections += 1
                conn.queue.append(
                    (
                        None,
                        self.app.error(
                            HTTPStatus.SERVICE_UNAVAILABLE,
                            "too many connections"
                            f" (api.max_connections {self.limits.max_connections})",
                        ),
                        True,
                    )
                )
                conn.answer(in_worker=False)
            self.connections.add(conn)  # a refused one too: it lingers, then the sweep ends it
            self._progress(conn, fresh=False)

    def _admit(self) -> bool:
        """Room for one more connection: at the cap, the longest-idle one makes room."""
        if len(self.connections) < self.limits.max_connections:
            return True
        victim = min(
            (c for c in self.connections if c.evictable), key=lambda c: c.last_active, default=None
        )
        if victim is None:
            return False
        victim.close()
        self._forget(victim)
        return True

    def _on_event(self, conn: _Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            conn.flush()
        if mask & selectors.EVENT_READ and not conn.closed:
            data = conn.recv()
            if data is not None:
                conn.feed(data)
        self._progress(conn, fresh=False)

    def _progress(self, conn: _Connection, fresh: bool) -> None:
        """Answer what can be answered here, hand the rest to a worker, or wait for bytes."""
        if not conn.closed and not conn.answer(in_worker=False):
            self._watch(conn, 0)
            conn.in_worker = True
            assert self._pool is not None
            self._pool.submit(lambda: self._work(conn))
            return
        conn.settle(fresh)
        if conn.closed:
            self._forget(conn)
            return
        if self.stopping and conn.state != _LINGER and not conn.queue and not conn.out:
            conn.close()
            self._forget(conn)
            return
        # After the client's EOF the socket reads as ready for ever: watch writes only.
        read = 0 if conn.eof else selectors.EVENT_READ
        self._watch(conn, read | (selectors.EVENT_WRITE if conn.out else 0))

    def _watch(self, conn: _Connection, events: int) -> None:
        selector = self._selector
        assert selector is not None
        if events == conn.registered:
            return
        if conn.registered and events:
            selector.modify(conn.sock, events, conn)
        elif events:
            selector.register(conn.sock, events, conn)
        else:
            selector.unregister(conn.sock)
        conn.registered = events

    def _forget(self, conn: _Connection) -> None:
        if conn.registered and self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
            conn.registered = 0
        self.connections.discard(conn)

    def _begin_stop(self) -> None:
        self.stopping = True
        if self._listener is not None and self._selector is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        for conn in list(self.connections):
            if not conn.in_worker:  # idle, half-received or lingering: nothing to finish
                conn.close()
                self._forget(conn)

    # -- a worker --------------------------------------------------------------------------

    def _work(self, conn: _Connection) -> None:
        """Answer the connection's requests; keep it for ``HOLD_S`` while its client sends the
        next one at once (and up to ``REST_S`` for the rest of that request, which a large body
        needs); hand it back to the I/O thread otherwise."""
        pool = self._pool
        assert pool is not None
        try:
            poller = select.poll()
            poller.register(conn.sock, select.POLLIN)
            rest_until = 0.0
            spin = self.limits.busy_poll_s
            while True:
                conn.answer(in_worker=True)
                if (
                    conn.closed
                    or conn.queue
                    or conn.out
                    or conn.eof
                    or conn.close_after
                    or conn.state == _LINGER
                    or self.stopping
                ):
                    break
                if conn.state == _IDLE:
                    if pool.waiting():  # others wait for a worker: no holding on
                        break
                    wait = HOLD_S
                    rest_until = 0.0
                else:  # half a request is in
                    now = time.monotonic()
                    rest_until = rest_until or now + REST_S
                    wait = rest_until - now
                    if wait <= 0:  # a slow sender: the I/O thread waits for the rest
                        break
                # A client on this core has usually sent its next request by the time the
                # worker gets here (it ran when the reply woke it): read before polling.
                data = conn.recv()
                if data is None:
                    idle_from = time.perf_counter()
                    if spin and conn.quick and conn.state == _IDLE:
                        data = self._spin(conn, poller, idle_from + spin)
                if data is None:
                    if not poller.poll(wait * 1000):
                        break
                    data = conn.recv()
                    if data is None:
                        break
                    # a client that answers within the window is worth spinning for again
                    conn.quick = time.perf_counter() - idle_from <= spin
                conn.feed(data)
        except Exception:
            log.exception("API worker failed on a connection")
            conn.close()
        finally:
            self._returned.put(conn)
            self._wake()

    def _spin(self, conn: _Connection, poller: select.poll, until: float) -> bytes | None:
        """The client's next request if it arrives before ``until``, checked without sleeping;
        None if it does not (the connection is then marked slow), if another worker is
        spinning, or once other connections wait for a worker.

        A worker asleep in poll is woken by the kernel when the request arrives; on a device
        whose other cores are idle (and in a VM, whose idle virtual CPUs the host takes back)
        that wake-up and the caches it finds cold cost 40-80 us of a small request's round
        trip on the 2-core development machine (``bench.serve``). A client that sends its
        next request at once finds the worker still running. The cost is bounded: one worker
        spins at a time, each check yields the CPU to any thread that wants it (the client
        on the same core, another request), and a client that did not send within the
        window is not spun for again until it does.
        """
        if not self._spin_lock.acquire(blocking=False):
            return None
        try:
            pool = self._pool
            while time.perf_counter() < until and not (pool is not None and pool.waiting()):
                os.sched_yield()  # releases the GIL and the CPU
                if poller.poll(0):
                    self.busy_poll_hits += 1
                    return conn.recv()
            self.busy_poll_misses += 1
            conn.quick = False
            return None
        finally:
            self._spin_lock.release()

    # -- shared --------------------------------------------------------------------------------

    def count(self, status: int) -> None:
        with self._count_lock:
            self.requests += 1
            if 400 <= status < 500:
                self.bad_requests += 1

    def encode(
        self, response: Response, *, head_only: bool, close: bool, keep_alive_10: bool
    ) -> bytes:
        status = response.status
        body = response.body
        now = int(time.time())
        second, date_line = self._date
        if now != second:
            date_line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode("latin-1")
            self._date = (now, date_line)
        head = (
            f"{_STATUS_LINES[status]}"
            f"Content-Type: {response.content_type}\r\nContent-Length: {len(body)}\r\n"
        )
        for name, value in response.headers:
            head += f"{name}: {value}\r\n"
        if close:
            head += "Connection: close\r\n"
        elif keep_alive_10:
            head += "Connection: keep-alive\r\n"
        # One write for head and body: with TCP_NODELAY two writes are two packets.
        out = head.encode("latin-1") + date_line + self._server_line + b"\r\n"
        return out if head_only else out + body
