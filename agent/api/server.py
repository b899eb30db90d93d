"""The local inference API: KServe Open Inference Protocol v2 over HTTP/1.1 keep-alive.

:mod:`agent.api.http1` keeps the connections (llhttp parsing, limits, timeouts, one event loop
thread and ``api.workers`` worker threads); this module is the API behind it: the routes, who may
call them, and how errors become statuses.

Who may call: the API listens on loopback, where any web page open in a browser on the device
can send it requests. So the Host header must name the listen address (a DNS-rebound name does
not), an Origin header must be in ``api.allowed_origins``, and a POST body must be JSON or the
binary tensor extension, never a form or ``text/plain`` that a page can send without a CORS
preflight. Off loopback a bearer token is required as well, unless ``api.insecure`` says not to.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

from agent import __version__
from agent.api import v2
from agent.api.http1 import HttpServer, Limits, Request, Response
from agent.config import ApiConfig, listen_address
from agent.slots import ModelSlot
from runtime.addresses import read_token_file
from runtime.errors import BackendError, InferdError, InputError, ModelNotFoundError, NotReadyError
from telemetry.prometheus import CONTENT_TYPE, Family, process_families, render
from telemetry.request_histogram import RequestHistograms, Totals, add_histogram
from telemetry.resources import cpu_temperature, thermal_zone

log = logging.getLogger(__name__)

FeedbackHandler = Callable[[str, bytes], Mapping[str, Any]]
"""(model name, request body) -> JSON-able reply; raises InputError on a bad body."""
MetricsText = Callable[[], str]
"""Extra Prometheus exposition text appended to /metrics."""

_HEADER_LENGTH = "Inference-Header-Content-Length"
_HEADER_LENGTH_KEY = _HEADER_LENGTH.lower()
_MODEL_PATH = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/infer|/ready|/feedback)?$"
)
_STATIC = {"/v2/health/live": "live", "/v2/health/ready": "ready", "/v2": "server"}
_STATIC["/metrics"] = "metrics"
_MODEL_ROUTES = {None: "model", "/ready": "model_ready", "/infer": "infer", "/feedback": "feedback"}
_READ = ("GET", "HEAD")
_ALLOW: dict[str, tuple[str, ...]] = {
    "live": _READ,
    "ready": _READ,
    "server": _READ,
    "metrics": _READ,
    "model": _READ,
    "model_ready": _READ,
    "infer": ("POST",),
    "feedback": ("POST",),
}
_INLINE = frozenset({"live", "ready", "server"})
"""Answered on the I/O thread: they never block, and the watchdog's probe must not queue
behind inferences."""
_OPEN = frozenset({"live", "ready"})
"""Routes that need no token: probes (the daemon's own watchdog among them) carry none."""
_JSON_TYPES = frozenset({None, "application/json"})
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})

_ERROR_STATUS: tuple[tuple[type[Exception], HTTPStatus], ...] = (
    (InputError, HTTPStatus.BAD_REQUEST),
    (ModelNotFoundError, HTTPStatus.NOT_FOUND),
    (NotReadyError, HTTPStatus.SERVICE_UNAVAILABLE),
)


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Route:
    __slots__ = ("kind", "name", "version")

    def __init__(self, kind: str, name: str | None = None, version: str | None = None) -> None:
        self.kind = kind
        self.name = name
        self.version = version


def _route(path: str) -> _Route | None:
    route = _ROUTES.get(path, _MISSING)
    if route is not _MISSING:
        return route
    kind = _STATIC.get(path)
    if kind is not None:
        route = _Route(kind)
    else:
        m = _MODEL_PATH.match(path)
        route = None if m is None else _Route(_MODEL_ROUTES[m["rest"]], m["name"], m["version"])
    if len(_ROUTES) >= 256:  # clients may send any path: keep the memo small
        _ROUTES.clear()
    _ROUTES[path] = route
    return route


_MISSING = _Route("")
_ROUTES: dict[str, _Route | None] = {}
"""Paths seen lately and their routes: a keep-alive client asks the same few paths."""


def allowed_hosts(address: tuple[str, int] | str) -> frozenset[str] | None:
    """The Host header values that name this API (lower case); None: any will do.

    A unix socket is out of a browser's reach, and a wildcard listen answers to every name the
    host has (off loopback, the bearer token is what protects it).
    """
    if isinstance(address, str):
        return None
    host, port = address
    if host in _WILDCARDS:
        return None
    names = {*_LOOPBACK_NAMES, f"[{host}]" if ":" in host else host.lower()}
    hosts = {f"{name}:{port}" for name in names}
    if port == 80:
        hosts |= names
    return frozenset(hosts)


def _remove_stale_socket(path: str) -> None:
    """Remove the socket file a dead server left at ``path``; refuse one a live server answers on
    (taking it over would leave that server running, unreachable) and anything not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # nobody listens: a stale file from a process that died
        return
    except TimeoutError:
        pass  # a server too busy to accept within a second is still a server
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process is serving on this socket")


def _media_type(value: str | None) -> str | None:
    if value is None or value == "application/json":
        return value
    return value.split(";", 1)[0].strip().lower()


class ApiServer:
    """Serves the v2 API for a set of model slots on TCP or a unix socket."""

    def __init__(self, config: ApiConfig, slots: Mapping[str, ModelSlot]) -> None:
        self.config = config
        self.slots = slots
        self.feedback: FeedbackHandler | None = None
        self.metrics_text: list[MetricsText] = []
        self.request_histograms = RequestHistograms()
        """Per-request counts and latency histogram for /metrics, fed as a slot listener."""
        for slot in slots.values():
            slot.listeners.append(self.request_histograms.listener)
        self.thermal: Path | None = None
        """The sysfs ``temp`` file read for ``inferd_cpu_temperature_celsius`` (tests set one)."""
        with contextlib.suppress(OSError):  # an unreadable zone costs the gauge, not the start
            self.thermal = thermal_zone()
        self.ready_checks: list[Callable[[], str | None]] = []
        """Other parts' readiness: each returns None when fine, else what is wrong (e.g. the
        MQTT link's telemetry forwarder being restarted)."""
        self.live = True
        self._http = HttpServer(
            self,
            Limits(
                max_connections=config.max_connections,
                max_header_bytes=config.max_header_bytes,
                max_body_bytes=config.max_body_bytes,
                header_timeout_s=config.header_timeout_s,
                body_timeout_s=config.body_timeout_s,
                idle_timeout_s=config.idle_timeout_s,
                drain_timeout_s=config.drain_timeout_s,
                busy_poll_s=config.busy_poll_us / 1e6,
            ),
            workers=config.workers,
            server_header=f"inferd/{__version__}",
            name="inferd-api",
        )
        self._bound: tuple[str, int] | str | None = None
        self._hosts: frozenset[str] | None = None
        self._origins = frozenset(o.lower() for o in config.allowed_origins)
        self._token: bytes | None = None

    @property
    def address(self) -> tuple[str, int] | str:
        """Where the server listens (the real port when 0 was configured)."""
        return self._bound if self._bound is not None else listen_address(self.config.listen)

    @property
    def requests(self) -> int:
        """Responses sent."""
        return self._http.requests

    @property
    def bad_requests(self) -> int:
        """4xx responses sent."""
        return self._http.bad_requests

    def start(self) -> None:
        """Bind, then serve in the background; raises InferdError when it cannot listen."""
        self._token = self._read_token()
        sock = self._bind()
        self._bound = (
            sock.getsockname() if sock.family == socket.AF_UNIX else sock.getsockname()[:2]
        )
        self._hosts = allowed_hosts(self.address)
        where = self.address
        # said before the first request can be answered: a client that saw the API answer (the
        # readiness probe, a test) finds the line already written
        log.info(
            "API listening on %s",
            self.config.listen if isinstance(where, str) else f"http://{where[0]}:{where[1]}",
        )
        self._http.start(sock)
        if self.config.insecure and self._token is None:
            log.warning(
                "api.insecure is set: the API on %s takes requests without a token",
                self.config.listen,
            )

    def _read_token(self) -> bytes | None:
        path = self.config.token_file
        return None if path is None else read_token_file(path, "api.token_file")

    def _bind(self) -> socket.socket:
        where = listen_address(self.config.listen)
        try:
            if isinstance(where, str):
                Path(where).parent.mkdir(parents=True, exist_ok=True)
                _remove_stale_socket(where)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.bind(where)
                    os.chmod(where, 0o660)
                except OSError:
                    sock.close()
                    raise
                return sock
            family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(where)
            except OSError:
                sock.close()
                raise
            return sock
        except OSError as err:
            raise InferdError(
                f"api.listen {self.config.listen}: cannot listen: {err.strerror}"
            ) from err

    def stop(self) -> None:
        """Stop accepting, let running requests finish (a few seconds at most), close every
        connection, join the threads, remove the unix socket file."""
        self._http.stop()
        where = self._bound
        if isinstance(where, str) and os.path.exists(where):
            os.unlink(where)

    # -- http1.Application -----------------------------------------------------------------

    def error(self, status: HTTPStatus, message: str) -> Response:
        """``{"error": message}`` with ``status``."""
        return Response(status, v2.error_body(message))

    def check(self, request: Request) -> Response | None:
        """Refuse a request on its head alone: who sent it, where to, what body it carries."""
        headers = request.headers
        if self._hosts is not None:
            host = headers.get("host")
            if host is not None and host.lower() not in self._hosts:
                return self.error(HTTPStatus.FORBIDDEN, "the Host header does not name this API")
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self._origins:
            return self.error(
                HTTPStatus.FORBIDDEN, f"origin {origin!r} is not in api.allowed_origins"
            )
        route = _route(request.path)
        if route is None:
            return self.error(
                HTTPStatus.NOT_FOUND, f"no such endpoint: {request.method} {request.path}"
            )
        request.context = route
        if self._token is not None and route.kind not in _OPEN:
            scheme, _, credential = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                credential.strip().encode("latin-1"), self._token
            ):
                return Response(
                    HTTPStatus.UNAUTHORIZED,
                    v2.error_body("this API needs Authorization: Bearer <token>"),
                    headers=(("WWW-Authenticate", "Bearer"),),
                )
        allowed = _ALLOW[route.kind]
        if request.method not in allowed:
            return Response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                v2.error_body(f"{request.method} not allowed on {request.path}"),
                headers=(("Allow", ", ".join(allowed)),),
            )
        if request.method == "POST":
            media = _media_type(headers.get("content-type"))
            binary = headers.get(_HEADER_LENGTH_KEY)
            if media not in _JSON_TYPES and not (
                media == "application/octet-stream" and binary is not None
            ):
                return self.error(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    "the body must be application/json (or application/octet-stream with"
                    f" {_HEADER_LENGTH})",
                )
            if binary is not None and not (binary.isascii() and binary.isdigit()):
                return self.error(HTTPStatus.BAD_REQUEST, f"invalid {_HEADER_LENGTH}")
        return None

    def inline(self, request: Request) -> bool:
        """Health and server metadata are answered on the I/O thread."""
        route = request.context
        return isinstance(route, _Route) and route.kind in _INLINE

    def respond(self, request: Request) -> Response:
        """Run the route; every failure becomes a status and a message that leaks nothing."""
        try:
            return self._respond(request)
        except _HttpError as err:
            return self.error(err.status, str(err))
        except InferdError as err:
            status = next((st for cls, st in _ERROR_STATUS if isinstance(err, cls)), None)
            if status is not None:
                return self.error(status, str(err))
            # A runtime's or a component's message can hold paths and library internals: it
            # goes to the log, the client learns only that the server failed.
            log.error("%s %s failed: %s", request.method, request.path, err)
            what = "the model failed to run" if isinstance(err, BackendError) else "server error"
            return self.error(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"{what}; the daemon log has the details"
            )
        except RecursionError:  # a decoder's guard against deep nesting, wherever it is used
            return self.error(HTTPStatus.BAD_REQUEST, "malformed JSON: nested too deeply")
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            return self.error(
                HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; the daemon log has the details"
            )

    # -- routes ----------------------------------------------------------------------------

    def slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            raise ModelNotFoundError(f"model {name!r} not found; serving {', '.join(self.slots)}")
        return slot

    def _respond(self, request: Request) -> Response:
        route = request.context
        if not isinstance(route, _Route):  # check() refused or never ran: nothing to run
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {request.path}")
        kind = route.kind
        if kind == "live":
            return self._json(HTTPStatus.OK, {"live": self.live})
        if kind == "ready":
            ready = all(s.ready for s in self.slots.values())
            ready = ready and not any(check() for check in self.ready_checks)
            return self._json(
                HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, {"ready": ready}
            )
        if kind == "server":
            return self._json(
                HTTPStatus.OK, {"name": "inferd", "version": __version__, "extensions": []}
            )
        if kind == "metrics":
            return Response(HTTPStatus.OK, self.prometheus().encode(), CONTENT_TYPE)
        assert route.name is not None
        slot = self.slot(route.name)
        if kind == "feedback":
            if self.feedback is None:
                raise _HttpError(HTTPStatus.NOT_IMPLEMENTED, "quality monitoring is not enabled")
            return self._json(HTTPStatus.OK, self.feedback(slot.name, request.body))
        model = slot.current  # NotReadyError -> 503
        if route.version is not None and route.version != model.version:
            raise ModelNotFoundError(
                f"model {slot.name!r} has no version {route.version!r}; serving {model.version!r}"
            )
        if kind == "infer":
            raw = request.headers.get(_HEADER_LENGTH_KEY)
            length = int(raw) if raw is not None else None
            out, head_len = v2.infer(slot, request.body, length, request.later)
            if head_len is None:
                return Response(HTTPStatus.OK, out)
            return Response(
                HTTPStatus.OK,
                out,
                "application/octet-stream",
                headers=((_HEADER_LENGTH, str(head_len)),),
            )
        if kind == "model_ready":
            return self._json(HTTPStatus.OK, {"name": slot.name, "ready": True})
        meta = v2.model_metadata(slot.name, model.version, slot.config.runtime, model.backend)
        return self._json(HTTPStatus.OK, meta)

    @staticmethod
    def _json(status: HTTPStatus, obj: Any) -> Response:
        return Response(status, v2.encode(obj))

    def prometheus(self) -> str:
        """Prometheus text exposition of per-model counters and the API's own.

        Requests, errors and the latency histogram count requests (a batch counts each of its
        requests, with the latency each saw); ``inferd_model_runs_total`` and
        ``inferd_inference_seconds_sum`` count backend runs (a batch once).
        """
        ready = Family("inferd_model_ready", "gauge", "Whether the model slot serves.")
        served = Family(
            "inferd_inference_requests_total", "counter", "Inference requests, failed ones too."
        )
        errors = Family("inferd_inference_errors_total", "counter", "Failed inference requests.")
        latency = Family(
            "inferd_inference_duration_seconds",
            "histogram",
            "Latency of successful inference requests (a batched one's queue wait included).",
        )
        runs = Family("inferd_model_runs_total", "counter", "Backend runs (a batch runs once).")
        seconds = Family("inferd_inference_seconds_sum", "counter", "Time spent in backend runs.")
        totals = self.request_histograms.totals()
        for slot in self.slots.values():
            if not slot.ready:
                ready.add(0, model=slot.name)
                continue
            model = slot.current
            st = model.backend.stats
            pairs = {"model": slot.name, "version": model.version}
            ready.add(1, **pairs)
            mine = totals.get((slot.name, model.version)) or Totals.empty()
            served.add(mine.requests, **pairs)
            errors.add(mine.errors, **pairs)
            add_histogram(latency, mine, **pairs)
            runs.add(st.runs, **pairs)
            seconds.add(f"{st.total_ns / 1e9:.9f}", **pairs)
        http = self._http
        requests = Family("inferd_http_requests_total", "counter", "HTTP responses sent.")
        requests.add(http.requests)
        bad = Family("inferd_http_bad_requests_total", "counter", "HTTP 4xx replies.")
        bad.add(http.bad_requests)
        conns = Family("inferd_http_connections", "gauge", "Open HTTP connections.")
        conns.add(len(http.connections))
        timeouts = Family("inferd_http_timeouts_total", "counter", "Requests cut by a timeout.")
        timeouts.add(http.timeouts)
        refused = Family(
            "inferd_http_connections_refused_total", "counter", "Connections refused at the cap."
        )
        refused.add(http.rejected_connections)
        polls = Family(
            "inferd_http_busy_polls_total",
            "counter",
            "Checks for a keep-alive client's next request without sleeping (api.busy_poll_us),"
            " by whether it came within the window.",
        )
        polls.add(http.busy_poll_hits, result="hit")
        polls.add(http.busy_poll_misses, result="miss")
        models = [ready, served, errors, latency, runs, seconds]
        out = render([*models, requests, bad, conns, timeouts, refused, polls])
        out += render(process_families(cpu_temperature(self.thermal)))
        for extra in self.metrics_text:
            out += extra()
        return out
