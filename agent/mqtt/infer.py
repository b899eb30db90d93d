"""MQTT request/response inference on ``{prefix}/{device}/infer/{model}``.

The request body is an Open Inference Protocol v2 infer request (the same JSON as
``POST /v2/models/{model}/infer``, decoded and encoded by :mod:`agent.api.v2`). The reply goes to
the request's MQTT 5 response topic with its correlation data; a client without MQTT 5 gets it
on ``{request topic}/reply`` and matches it by the v2 ``id``. Every reply carries a ``status``
user property with the HTTP status the local API would give; an error reply's body is
``{"error": "..."}``. Bad requests are answered, never ignored: a payload over the size limit
(``mqtt.max_payload_bytes``, by default ``api.max_body_bytes``) gets 413 without being kept, any
decoding error the same 4xx as over HTTP, an unexpected failure 500 without its text. Binary
tensors work as over HTTP, with the ``Inference-Header-Content-Length`` user property.

Replies go out through :meth:`~agent.mqtt.link.MqttLink.send_reply`, which refuses response
topics outside ``mqtt.reply_topic_prefixes`` and any topic the device itself reads.
Requests waiting for a worker hold at most ``queue`` requests and ``queue_bytes`` bytes; beyond
either the answer is 503.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

from agent.api import v2
from agent.mqtt.link import Inbound, MqttLink
from agent.slots import ModelSlot
from runtime.errors import BackendError, InferdError, InputError, ModelNotFoundError, NotReadyError

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
_STATUS: tuple[tuple[type[InferdError], HTTPStatus], ...] = (
    (InputError, HTTPStatus.BAD_REQUEST),
    (ModelNotFoundError, HTTPStatus.NOT_FOUND),
    (NotReadyError, HTTPStatus.SERVICE_UNAVAILABLE),
    (BackendError, HTTPStatus.INTERNAL_SERVER_ERROR),
)


class MqttInference:
    """Answers infer requests from the link on a small pool of named threads."""

    def __init__(
        self,
        link: MqttLink,
        slots: Mapping[str, ModelSlot],
        workers: int = 2,
        queue: int = 64,
        *,
        max_payload_bytes: int = 16 * 1024 * 1024,
        queue_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.link = link
        self.slots = slots
        self.workers = workers
        self.max_payload_bytes = max_payload_bytes
        self.queue_bytes = queue_bytes
        self._room = threading.BoundedSemaphore(queue)
        self._bytes = 0
        self._bytes_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        link.subscribe(link.topic("infer/+"), self._on_request, max_bytes=max_payload_bytes)

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="inferd-mqtt-infer")

    def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _on_request(self, msg: Inbound) -> None:
        if msg.oversize:
            body = v2.error_body(
                f"request of {msg.size} bytes is over the limit of {self.max_payload_bytes}"
            )
            self._reply(msg, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, body)
            return
        pool = self._pool
        size = len(msg.payload)
        if pool is None or not self._room.acquire(blocking=False):
            self._reply(msg, HTTPStatus.SERVICE_UNAVAILABLE, v2.error_body("busy, try again"))
            return
        with self._bytes_lock:
            fits = self._bytes + size <= self.queue_bytes
            if fits:
                self._bytes += size
        if not fits:
            self._room.release()
            self._reply(msg, HTTPStatus.SERVICE_UNAVAILABLE, v2.error_body("busy, try again"))
            return
        try:
            pool.submit(self._serve, msg)
        except RuntimeError:  # shutting down
            self._done(size)

    def _done(self, size: int) -> None:
        with self._bytes_lock:
            self._bytes -= size
        self._room.release()

    def _serve(self, msg: Inbound) -> None:
        try:
            status, body, head_len = self.answer(msg)
            self._reply(msg, status, body, head_len)
        finally:
            self._done(len(msg.payload))

    def answer(self, msg: Inbound) -> tuple[HTTPStatus, bytes, int | None]:
        """(status, body, JSON header length of a binary body) for one request."""
        name = msg.topic.rsplit("/", 1)[1]
        try:
            slot = self.slots.get(name)
            if slot is None:
                raise ModelNotFoundError(
                    f"model {name!r} not found; serving {', '.join(self.slots) or 'nothing'}"
                )
            header = dict(msg.user_properties).get(HEADER_LENGTH)
            try:
                head_len = int(header) if header is not None else None
            except ValueError:
                raise InputError(f"{HEADER_LENGTH} {header!r} is not a number") from None
            body, out_len = v2.infer(slot, msg.payload, head_len)
        except InferdError as err:
            status = next(
                (s for kind, s in _STATUS if isinstance(err, kind)),
                HTTPStatus.INTERNAL_SERVER_ERROR,
            )
            return status, v2.error_body(str(err)), None
        except Exception:
            # Whatever broke, the requester hears about it (never the exception's text).
            log.exception("mqtt infer %s: unexpected error", name)
            return HTTPStatus.INTERNAL_SERVER_ERROR, v2.error_body("internal error"), None
        return HTTPStatus.OK, body, out_len

    def _reply(
        self, msg: Inbound, status: HTTPStatus, body: bytes, head_len: int | None = None
    ) -> None:
        props = {"status": str(int(status))}
        if head_len is not None:
            props[HEADER_LENGTH] = str(head_len)
        topic = msg.response_topic or f"{msg.topic}/reply"
        sent = self.link.send_reply(
            topic, body, correlation_data=msg.correlation_data, user_properties=props
        )
        if not sent and not self.link.connected:
            log.warning("mqtt infer: no connection, reply to %s lost", topic[:200])
