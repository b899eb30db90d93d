"""The agent's one MQTT link: connection, spool forwarding, subscriptions, commands, events, status.

API for the rest of the agent (every call is thread-safe and never blocks on the network):

``link.emit_event(kind, message, *, level="info", model=None, version=None, **details)``
    Queue an :class:`~telemetry.payloads.Event` on ``{prefix}/{device}/events``. Events go
    through the spool and are never dropped. Pass the bound method as a narrow callable
    (:class:`telemetry.payloads.EventSink`) to code outside the agent, e.g. the updater.
``link.publish_status()``
    Re-publish the retained ``status`` (call it when something in it changes, e.g. a slot's
    ``update_state``). Only the newest unsent status is kept.
``link.on_command(name, handler)``
    Run ``handler(cmd: Command) -> dict | None`` for ``{prefix}/{device}/cmd/{name}`` and for
    ``{prefix}/groups/{group}/{name}`` of every group the device is in (``cmd.group`` tells
    which; ``cmd.retained`` is true for a retained poke replayed on subscribe). ``cmd.args`` is
    the JSON object of the message (``{}`` for an empty message). Raise an ``InferdError`` to
    refuse. When the sender gave an MQTT 5 response topic the link replies with a
    :class:`~telemetry.payloads.CommandReply` (``result`` is the handler's return value);
    a refused or unknown command is also an ``events`` entry of kind ``command-failed``.
``link.subscribe(filter, handler)``
    Run ``handler(msg: Inbound)`` for every message matching ``filter``; restored after
    every reconnect.
``link.publish(leaf, payload, *, records=0, kind=None)`` / ``link.send_now(topic, payload, ...)``
    Queue bytes on ``{prefix}/{device}/{leaf}`` through the spool / send at once, unspooled
    (QoS 0 metrics). ``kind`` (:class:`~telemetry.spool.Kind`) says whether the spool may drop
    the message when full.
``link.send_reply(topic, payload, ...)``
    Send a response (to an inference request or a command) at once, unspooled, but only onto a
    topic :meth:`MqttLink.reply_refusal` accepts: under ``mqtt.reply_topic_prefixes`` and never
    one the device subscribes to, a group topic, or any device's commands, requests or
    telemetry. A requester chooses the response topic; without this check any client allowed
    to send an inference request could make the device publish on its own command topic and
    command itself (a reply is JSON, and ``{}`` is a valid ``rollback``). A refused reply is
    counted (``refused_replies``), logged and evented at most once a minute, never published.

Handlers run one at a time on the ``inferd-mqtt-dispatch`` thread: return quickly and hand long
work (an update check, an inference) to a thread of your own. Received messages waiting for
their handler hold at most ``mqtt.inbox_max_bytes``; an MQTT 5 broker is told that bound as the
client's Maximum Packet Size, so a larger message never reaches the device at all.

The forwarder thread is supervised: if it dies on an unexpected error it is restarted one to two
seconds later, with an ``mqtt-forwarder-restarted`` event, and :meth:`MqttLink.problem` (part of the
agent's readiness) names the fault until then. A spool whose pages are corrupt is moved aside
by the spool itself after repeated read errors (``spool-reset`` event).

Delivery: every outbound message except ``send_now`` is put in the spool first and sent from there
in order with QoS 1; a row is deleted only when the broker acknowledges it, so an outage, a
broker restart or an agent restart loses nothing (a message in flight at a disconnect may arrive
twice: at-least-once). On every (re)connect the link re-sends the birth ``status`` first, then
the backlog, and restores its subscriptions. Refused credentials or unusable TLS files are
logged once as one error line and retried slowly; the agent keeps serving and spooling.

Several brokers (``mqtt.hosts``, the nodes of a cluster): the link connects to the first that
answers and, when its node goes away, to the next one, round-robin, without waiting for the
lost node; only a full round of failed nodes backs off. The spool does not care which node
takes it: after the move it sends the birth status, then its backlog from the oldest row, in
order. ``status`` names the node (``broker``). A broker that refuses MQTT 5 (NATS and RabbitMQ
speak 3.1.1 only) is spoken to in 3.1.1 (see :meth:`MqttLink._v311_fallback`): no response
topics (MQTT inference replies go to ``{request topic}/reply``, commands are answered only by
events) and no Maximum Packet Size.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import Config
from agent.mqtt.homeassistant import publish_discovery
from runtime.errors import InferdError, MqttError
from telemetry.broker import V5_REFUSED, BrokerOptions, make_client
from telemetry.payloads import CommandReply, Event, Level, Offline, Status, utc_now
from telemetry.spool import Kind, Spool

log = logging.getLogger(__name__)

SPOOL_FILE = "telemetry-spool.sqlite"
WINDOW = 32
"""QoS 1 messages sent and not yet acknowledged, at most (and at most the broker's Receive Max)."""
_REFUSED_AUTH = {"Bad user name or password", "Not authorized", "Bad authentication method"}
_WILDCARDS = ("#", "+", "\x00")
REPORT_EVERY_S = 60.0
"""Repeated refusals and drops are logged and evented at most this often."""
SUPERVISE_S = 1.0
"""How often the network thread checks that the forwarder thread is alive."""
RESTART_AFTER_S = 1.0
"""A dead forwarder is started again no sooner than this after it died: a fault that recurs at
once costs a restart a second, not a busy loop."""
REPLY_WAIT_S = 5.0
"""How long :meth:`MqttLink.send_reply` waits for the broker to take a reply."""


@dataclass(frozen=True)
class Inbound:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    size: int = 0
    """Bytes of the payload as received (``payload`` is empty when it was over the limit)."""
    oversize: bool = False
    """The payload was larger than the subscription's ``max_bytes`` and was not kept."""


@dataclass(frozen=True)
class Command:
    """A command sent to this device, directly or to one of its groups."""

    name: str
    args: dict[str, Any]
    topic: str
    group: str | None = None
    retained: bool = False


Handler = Callable[[Inbound], None]
CommandHandler = Callable[[Command], "dict[str, Any] | None"]


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Exponential backoff with jitter: uniform between ``low`` and ``low * 2**attempt`` (capped).

    The jitter keeps a fleet from reconnecting in lockstep after a broker restart.
    """
    return random.uniform(low, min(high, low * 2 ** min(attempt, 32)))


def broker_options(config: Config) -> BrokerOptions:
    """The paho connection options for the agent's ``mqtt`` config section."""
    m = config.mqtt
    nodes = m.nodes
    return BrokerOptions(
        host=nodes[0][0],
        port=nodes[0][1],
        hosts=nodes if len(nodes) > 1 else (),
        protocol=m.protocol,
        client_id=m.client_id or f"inferd-{config.device_id}",
        username=m.username,
        password=m.secret(),
        tls=m.tls is not None,
        ca_file=m.tls.ca_file if m.tls else None,
        cert_file=m.tls.cert_file if m.tls else None,
        key_file=m.tls.key_file if m.tls else None,
        tls_insecure=bool(m.tls and m.tls.insecure),
        keepalive_s=m.keepalive_s,
    )


@dataclass
class _Forwarding:
    """State of the forwarder thread, reset on every new connection."""

    generation: int = -1
    cursor: int = 0
    inflight: dict[int, int] = field(default_factory=dict)
    """paho mid -> stream row id."""
    latest_inflight: dict[int, tuple[str, int]] = field(default_factory=dict)
    """paho mid -> (topic, seq) of a latest-value message."""
    latest_seen: int = -1
    spool_generation: int = 0
    """The spool's generation the cursor belongs to (a reset spool starts ids again)."""


class MqttLink:
    """One MQTT connection for the whole agent; ``start``/``stop`` like every component."""

    def __init__(self, config: Config, status: Callable[[], Status]) -> None:
        self.config = config
        self.device = config.device_id
        self.prefix = config.mqtt.topic_prefix
        self.root = f"{self.prefix}/{self.device}"
        self.status_topic = f"{self.root}/status"
        self._status = status
        tel = config.telemetry
        self.spool = Spool(
            Path(config.state_dir) / SPOOL_FILE,
            tel.spool_max_bytes,
            self._wake,
            hard_max_bytes=tel.spool_hard_max_bytes,
            feedback_share=tel.spool_feedback_share,
            on_drop=self._spool_dropped,
            on_full=self._spool_full,
            on_reset=self._spool_reset,
        )
        self._reply_prefixes = tuple(
            p.replace("{root}", self.root) for p in config.mqtt.reply_topic_prefixes
        )
        self._inbox_max = config.mqtt.inbox_max_bytes
        self._inbox_bytes = 0
        self._inbox_lock = threading.Lock()
        self._limits: dict[str, int] = {}
        self._reported: dict[str, float] = {}
        self.refused_replies = 0
        """Replies not sent because their topic was refused (see :meth:`reply_refusal`)."""
        self.dropped_inbound = 0
        """Received messages dropped because the inbox was full."""
        self.forwarder_restarts = 0
        """Times the forwarder thread died and was started again."""
        self._forwarder: threading.Thread | None = None
        self._forwarder_fault: str | None = None
        self._forwarder_died = 0.0
        self._client: mqtt.Client | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._pub_lock = threading.Lock()
        self._acks: deque[tuple[int, int, ReasonCode]] = deque()
        self._generation = 0
        self._window = WINDOW
        self._connected = False
        self._refused: str | None = None
        self._problem: str | None = None
        self._subs: dict[str, list[Handler]] = {}
        self._commands: dict[str, CommandHandler] = {}
        self._inbox: queue.Queue[tuple[Handler, Inbound] | None] = queue.Queue(maxsize=1000)
        self._threads: list[threading.Thread] = []
        self._rejected_topics: set[str] = set()
        self._rejected_lock = threading.Lock()
        self.connects = 0
        """Successful connections so far (tests and the status of the link)."""
        self.node: str | None = None
        """``host:port`` of the broker node the link is on (or trying); ``broker`` in status."""
        self._protocol = config.mqtt.protocol
        """MQTT 5 until a broker refuses it (then 3.1.1 from then on)."""
        self._guessed_v311 = False
        """This connection is 3.1.1 because the broker closed an MQTT 5 one unanswered."""
        self._answered = False
        """The broker answered the CONNECT of the current connection (CONNACK, any code)."""
        self.subscribe(f"{self.root}/cmd/#", self._on_command_message)
        for group in config.groups:
            self.subscribe(f"{self.prefix}/groups/{group}/#", self._on_command_message)

    # --- public API ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def topic(self, leaf: str) -> str:
        """The full topic of ``leaf`` below this device's root."""
        return f"{self.root}/{leaf}"

    def publish(
        self, leaf: str, payload: bytes, *, records: int = 0, kind: Kind | None = None
    ) -> bool:
        """Queue ``payload`` on ``{root}/{leaf}`` (QoS 1); False if the spool dropped it."""
        return self.spool.put(self.topic(leaf), payload, records=records, kind=kind)

    def emit_event(
        self,
        kind: str,
        message: str,
        *,
        level: Level = "info",
        model: str | None = None,
        version: str | None = None,
        **details: Any,
    ) -> None:
        """Queue an event; see the module docstring."""
        event = Event(
            device=self.device,
            kind=kind,
            level=level,
            message=message,
            model=model,
            version=version,
            details=details,
        )
        self.spool.put(self.topic("events"), msgspec.json.encode(event))

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: the config now in effect (only live keys differ). Home Assistant's discovery
        configs carry the metrics interval (``expire_after``): when it changed they go out
        again, or HA would mark the metrics stale between two reports at a longer interval."""
        old, self.config = self.config, config
        if config.mqtt.homeassistant_discovery and (
            old.telemetry.metrics_interval_s != config.telemetry.metrics_interval_s
        ):
            publish_discovery(config, self.spool.put_latest)

    def publish_status(self) -> None:
        """Queue the current retained status, replacing an unsent older one."""
        try:
            status = msgspec.structs.replace(self._status(), broker=self.node)
            payload = msgspec.json.encode(status)
        except Exception:
            log.exception("mqtt: cannot build the status payload")
            return
        self.spool.put_latest(self.status_topic, payload)

    def subscribe(
        self, topic_filter: str, handler: Handler, *, max_bytes: int | None = None
    ) -> None:
        """Call ``handler`` for messages matching ``topic_filter`` (kept across reconnects).

        A message larger than ``max_bytes`` reaches the handler without its payload
        (``oversize``), so that it can be answered without being held.
        """
        with self._pub_lock:
            first = topic_filter not in self._subs
            self._subs.setdefault(topic_filter, []).append(handler)
            if max_bytes is not None:
                self._limits[topic_filter] = max_bytes
            client = self._client if self._connected else None
        if first and client is not None:
            client.subscribe(topic_filter, qos=1)

    def on_command(self, name: str, handler: CommandHandler) -> None:
        """Register the handler of command ``name``; see the module docstring."""
        if name in self._commands:
            raise ValueError(f"command {name!r} already has a handler")
        self._commands[name] = handler

    def send_now(
        self,
        topic: str,
        payload: bytes,
        *,
        correlation_data: bytes | None = None,
        user_properties: Mapping[str, str] | None = None,
        qos: int = 1,
        wait_s: float = 0.0,
    ) -> bool:
        """Send now, not through the spool (a response matters only while someone waits).

        False when there is no connection: the message is not kept. With ``wait_s``, return
        once the broker has the message (QoS 1: its PUBACK), or after ``wait_s`` seconds.
        """
        with self._pub_lock:
            client = self._client if self._connected else None
        if client is None:
            return False
        props = None
        if client.protocol == mqtt.MQTTv5 and (correlation_data or user_properties):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation_data:
                props.CorrelationData = correlation_data
            for key, value in (user_properties or {}).items():
                props.UserProperty = (key, value)
        info = client.publish(topic, payload, qos=qos, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        if wait_s > 0:
            with contextlib.suppress(ValueError, RuntimeError):  # lost with the connection
                info.wait_for_publish(wait_s)
        return True

    def reply_refusal(self, topic: str) -> str | None:
        """Why a reply may not be published on ``topic``; None when it may."""
        if not topic or len(topic.encode("utf-8", "replace")) > 65535:
            return "empty or too long"
        if any(c in topic for c in _WILDCARDS) or topic.startswith("$"):
            return "wildcards, NUL or a $ topic"
        with self._pub_lock:
            filters = list(self._subs)
        p = self.prefix
        # Never onto what this device reads, nor onto what any device reads or publishes:
        # commands, group topics, inference requests, and the leaves below a device's root.
        for f in (*filters, f"{p}/groups/#", f"{p}/+/cmd/#", f"{p}/+/infer/+", f"{p}/+/+"):
            if mqtt.topic_matches_sub(f, topic):
                return f"it is a command, request or telemetry topic ({f})"
        if not topic.startswith(self._reply_prefixes):
            return "it is not under mqtt.reply_topic_prefixes"
        return None

    def send_reply(
        self,
        topic: str,
        payload: bytes,
        *,
        correlation_data: bytes | None = None,
        user_properties: Mapping[str, str] | None = None,
    ) -> bool:
        """Send a response now if :meth:`reply_refusal` accepts its topic; False otherwise.

        Returns once the broker has it (at most :data:`REPLY_WAIT_S` later): paho keeps what
        it has not sent in memory without a bound, and inference replies of megabytes made
        faster than the connection drains them held hundreds of megabytes. Waiting here makes
        the requests wait in their bounded queue instead.
        """
        reason = self.reply_refusal(topic)
        if reason is not None:
            self.refused_replies += 1
            shown = topic if len(topic) <= 200 else topic[:200] + "..."
            if self._due("reply-refused"):
                log.warning(
                    "mqtt: refused to reply on %r: %s (%d replies refused so far)",
                    shown,
                    reason,
                    self.refused_replies,
                )
                self.emit_event(
                    "reply-refused",
                    f"a reply was not sent on {shown!r}: {reason}",
                    level="warning",
                    topic=shown,
                    refused=self.refused_replies,
                )
            else:
                log.debug("mqtt: refused to reply on %r: %s", shown, reason)
            return False
        return self.send_now(
            topic,
            payload,
            correlation_data=correlation_data,
            user_properties=user_properties,
            wait_s=REPLY_WAIT_S,
        )

    def problem(self) -> str | None:
        """None while the link works as it should; else one line saying what is wrong.

        Readiness includes it: telemetry that stopped flowing is something to restart for.
        A missing broker is not a problem (the agent spools until it is back).
        """
        if not self._threads or self._stop.is_set():
            return None
        if self._forwarder_fault is not None:
            return f"mqtt: the telemetry forwarder failed ({self._forwarder_fault}); restarting"
        forwarder = self._forwarder
        if forwarder is None or not forwarder.is_alive():
            return "mqtt: the telemetry forwarder is not running"
        return None

    def _due(self, what: str) -> bool:
        """True at most once per REPORT_EVERY_S for ``what`` (log lines, events)."""
        now = time.monotonic()
        with self._rejected_lock:
            last = self._reported.get(what)
            if last is not None and now - last < REPORT_EVERY_S:
                return False
            self._reported[what] = now
            return True

    def flush(self, timeout: float) -> bool:
        """Wait until the spool is empty (everything acknowledged); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.spool.pending == 0, timeout)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background; returns at once."""
        self._stop.clear()
        self._start_forwarder()
        for name, target in (
            ("inferd-mqtt", self._run_network),
            ("inferd-mqtt-dispatch", self._run_dispatch),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _start_forwarder(self) -> None:
        thread = threading.Thread(
            target=self._run_forwarder, name="inferd-mqtt-forward", daemon=True
        )
        self._forwarder = thread
        self._forwarder_fault = None
        thread.start()

    def _supervise(self) -> None:
        """Start the forwarder again if it died (network thread, every SUPERVISE_S)."""
        forwarder = self._forwarder
        if self._stop.is_set() or forwarder is None or forwarder.is_alive():
            return
        if time.monotonic() - self._forwarder_died < RESTART_AFTER_S:
            return
        forwarder.join()
        fault = self._forwarder_fault or "it ended"
        log.error("mqtt: restarting the telemetry forwarder (%s)", fault)
        self._start_forwarder()
        self.forwarder_restarts += 1
        self.emit_event(
            "mqtt-forwarder-restarted",
            f"the telemetry forwarder stopped ({fault}) and was restarted",
            level="error",
            restarts=self.forwarder_restarts,
        )

    def stop(self, timeout: float = 3.0) -> None:
        """Publish ``offline``, flush what the broker takes within ``timeout``, disconnect."""
        if self._connected:
            deadline = time.monotonic() + timeout
            self.flush(timeout)
            offline = Offline(device=self.device, ts=utc_now(), reason="shutdown")
            self.spool.put_latest(self.status_topic, msgspec.json.encode(offline))
            if not self.flush(max(0.5, deadline - time.monotonic())):
                log.warning("mqtt: %d messages stay spooled for the next start", self.spool.pending)
        self._stop.set()
        self._wake()
        self._inbox.put(None)
        client = self._client
        if client is not None:
            client.disconnect()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        forwarder, self._forwarder = self._forwarder, None
        if forwarder is not None:
            forwarder.join(timeout=10)
        self.spool.close()

    # --- connection ---------------------------------------------------------------------------

    def _report(self, problem: str) -> None:
        """Log a connection problem once; repeats of the same problem go to debug."""
        if problem != self._problem:
            log.error("mqtt: %s", problem)
            self._problem = problem
        else:
            log.debug("mqtt: %s", problem)

    def _run_network(self) -> None:
        base = broker_options(self.config)
        nodes = base.nodes
        low, high = self.config.mqtt.reconnect_min_s, self.config.mqtt.reconnect_max_s
        index = 0
        left = 0  # nodes tried since a connection last worked; a full round of them backs off
        attempt = 0
        while not self._stop.is_set():
            opts = replace(base.at(nodes[index]), protocol=self._protocol)
            self.node = f"{opts.host}:{opts.port}"
            self._refused = None
            self._answered = False
            slow = False
            connects_before = self.connects
            try:
                client = self._client or self._make_client(opts)
                if client.protocol == mqtt.MQTTv5:
                    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    # The broker drops what is larger instead of sending it: a huge message
                    # never takes the device's memory (MQTT 3.1.1 has no such bound).
                    props.MaximumPacketSize = self._inbox_max
                    client.connect(
                        opts.host, opts.port, opts.keepalive_s, clean_start=True, properties=props
                    )
                else:
                    client.connect(opts.host, opts.port, opts.keepalive_s)
            except MqttError as err:  # unusable TLS files: only the operator can fix them
                self._report(str(err))
                slow = True
            except (OSError, ssl.SSLError, ValueError) as err:
                self._report(f"cannot connect to {opts.where}: {_reason(err)}")
            else:
                checked = time.monotonic()
                while not self._stop.is_set():
                    if client.loop(timeout=0.5) != mqtt.MQTT_ERR_SUCCESS:
                        break
                    if time.monotonic() - checked >= SUPERVISE_S:
                        checked = time.monotonic()
                        self._supervise()
                was_up = self.connects > connects_before
                self._connected = False
                if self._v311_fallback(opts):
                    continue
                if self._refused is not None:
                    self._report(f"{opts.where} refused the connection: {self._refused}")
                    slow = True
                elif was_up and not self._stop.is_set():
                    log.warning(
                        "mqtt: connection to %s lost; %s",
                        opts.where,
                        "trying the next node" if len(nodes) > 1 else "spooling until it is back",
                    )
                    attempt = 0
                    left = 0
            if self._stop.is_set():
                break
            index = (index + 1) % len(nodes)
            left += 1
            if slow:
                delay = random.uniform(max(low, high / 2), high)
            elif left % len(nodes):
                delay = backoff_delay(1, low, high)  # the next node of this round, soon
            else:
                delay = backoff_delay(attempt, low, high)
                attempt += 1
            until = time.monotonic() + delay
            while not self._stop.wait(min(SUPERVISE_S, max(0.0, until - time.monotonic()))):
                self._supervise()
                if time.monotonic() >= until:
                    break
        self._connected = False

    def _v311_fallback(self, opts: BrokerOptions) -> bool:
        """After a connection ended: True when the next attempt is to be MQTT 3.1.1, at once.

        NATS answers an MQTT 5 CONNECT with "unsupported protocol version": the link speaks
        3.1.1 to it from then on. RabbitMQ 3.x closes the connection without a word, but so
        does a broker going down or a TCP load balancer without a backend: then 3.1.1 is tried
        at once, for that connection only, and the next one starts with MQTT 5 again.
        """
        unanswered = not self._answered and not self._stop.is_set()
        if self._protocol == "5" and self._refused == V5_REFUSED:
            self._v311_chosen(opts.where)
            return self._renew("3.1.1")
        if self._protocol == "5" and unanswered:
            self._guessed_v311 = True
            if self._due("v311-probe"):
                log.info(
                    "mqtt: %s closed an MQTT 5 connection unanswered; trying 3.1.1", opts.where
                )
            return self._renew("3.1.1")
        if self._guessed_v311:
            self._guessed_v311 = False
            self._renew("5")
        return False

    def _renew(self, protocol: Literal["5", "3.1.1"]) -> bool:
        """Speak ``protocol`` from the next connection on (a new paho client)."""
        self._protocol = protocol
        with self._pub_lock:
            self._client = None
        return True

    def _v311_chosen(self, where: str) -> None:
        # What needs MQTT 5 (response topics, the packet size bound) is off; the rest works.
        if self._due("v311"):
            log.warning(
                "mqtt: %s does not speak MQTT 5; using MQTT 3.1.1 (replies to MQTT requests go "
                "to {request topic}/reply, commands are answered by events)",
                where,
            )

    def _make_client(self, opts: BrokerOptions) -> mqtt.Client:
        client = make_client(opts)
        client.connect_timeout = min(10.0, float(opts.keepalive_s))
        # The forwarder's window is the only limit: paho's own inflight count is not reset by
        # drop_out_messages(), and a stale count would stall sending after a reconnect.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        offline = msgspec.json.encode(Offline(device=self.device))
        client.will_set(self.status_topic, offline, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        # paho writes to the socket from whichever thread calls publish() unless an event loop
        # says it does the writing. Ours does (client.loop() wakes on paho's socketpair and
        # writes), so the forwarder and dispatch threads only queue packets: one writer keeps
        # packets whole and in publish order.
        client.on_socket_register_write = _network_thread_writes
        self._client = client
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        self._answered = True
        if self._guessed_v311 and not reason.is_failure:
            self._v311_chosen(str(self.node))
        if reason.is_failure:
            self._refused = str(reason)
            if str(reason) in _REFUSED_AUTH:
                self._refused += " (check mqtt.username / password)"
            return
        receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        self.publish_status()  # the birth goes before the backlog: forwarder sends latest first
        publish_discovery(self.config, self.spool.put_latest)  # mqtt.homeassistant_discovery
        with self._pub_lock:
            # The spool is the only store: paho must not replay its own copies after a reconnect.
            client.drop_out_messages()
            self._window = min(WINDOW, receive_max) if receive_max else WINDOW
            self._generation += 1
            self._connected = True
            # Queued before the forwarder (which needs this lock) can send the birth status:
            # once the broker shows the device online, it already hears its commands.
            for topic_filter in self._subs:
                client.subscribe(topic_filter, qos=1)
        self.connects += 1
        if self._problem is not None or len(self.config.mqtt.nodes) > 1:
            log.info("mqtt: connected to %s", self.node)
            self._problem = None
        else:
            log.debug("mqtt: connected")
        self._wake()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        self._connected = False

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        with self._cond:
            self._acks.append((self._generation, mid, reason))
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- forwarding: spool -> broker ----------------------------------------------------------

    def _has_work(self, fw: _Forwarding) -> bool:
        if self._acks:
            return True
        if not self._connected:
            return False
        return (
            fw.generation != self._generation
            or fw.spool_generation != self.spool.generation
            or fw.latest_seen != self.spool.latest_seq
            or (self.spool.last_id > fw.cursor and len(fw.inflight) < self._window)
        )

    def _run_forwarder(self) -> None:
        try:
            self._forward()
        except Exception as err:
            # The network thread sees the thread gone and starts a new one (a fresh cursor
            # re-reads the spool from its oldest row: at-least-once, nothing lost).
            self._forwarder_died = time.monotonic()
            self._forwarder_fault = f"{type(err).__name__}: {err}"[:300]
            log.exception("mqtt: the telemetry forwarder failed")

    def _forward(self) -> None:
        fw = _Forwarding()
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._stop.is_set() or self._has_work(fw), 5.0):
                    continue
                if self._stop.is_set():
                    return
                acks = list(self._acks)
                self._acks.clear()
            try:
                self._settle(fw, acks)
                self._send(fw)
            except InferdError as err:  # the spool failed: say so, keep trying
                if self._due("forward-error"):
                    log.error("mqtt: %s", err)
                else:
                    log.debug("mqtt: %s", err)
                self._stop.wait(1.0)

    def _settle(self, fw: _Forwarding, acks: list[tuple[int, int, ReasonCode]]) -> None:
        done: list[int] = []
        if fw.spool_generation != self.spool.generation:
            return  # the rows in flight were in the spool that was moved aside
        for generation, mid, reason in acks:
            if generation != fw.generation:
                continue
            row = fw.inflight.pop(mid, None)
            latest = fw.latest_inflight.pop(mid, None)
            if reason.is_failure:
                # The broker will never take it (e.g. an ACL): drop it rather than block the queue.
                topic = latest[0] if latest else "?"
                if topic not in self._rejected_topics:
                    self._rejected_topics.add(topic)
                    log.error("mqtt: broker refused a message on %s: %s", topic, reason)
            if row is not None:
                done.append(row)
            if latest is not None:
                self.spool.ack_latest(*latest)
                fw.latest_seen = -1
        if done:
            self.spool.ack(done)
        if acks:
            with self._cond:
                self._cond.notify_all()  # flush() waiters

    def _send(self, fw: _Forwarding) -> None:
        with self._pub_lock:
            client = self._client
            if not self._connected or client is None:
                return
            if fw.generation != self._generation or fw.spool_generation != self.spool.generation:
                fw.generation = self._generation
                fw.spool_generation = self.spool.generation
                fw.cursor = 0
                fw.inflight.clear()
                fw.latest_inflight.clear()
                fw.latest_seen = -1
            if fw.latest_seen != self.spool.latest_seq:
                fw.latest_seen = self.spool.latest_seq
                pending = {t for t, _ in fw.latest_inflight.values()}
                for msg in self.spool.latest():
                    if msg.topic in pending:
                        continue  # an older one is in flight: its ack makes _settle look again
                    info = client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
                    fw.latest_inflight[info.mid] = (msg.topic, msg.key)
            room = self._window - len(fw.inflight)
            if room <= 0 or self.spool.last_id <= fw.cursor:
                return
            for msg in self.spool.read(fw.cursor, room):
                try:
                    info = client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
                except ValueError as err:  # e.g. over the MQTT size limit: it can never be sent
                    log.error("mqtt: dropping an unsendable message on %s: %s", msg.topic, err)
                    self.spool.ack([msg.key])
                else:
                    fw.inflight[info.mid] = msg.key
                fw.cursor = msg.key

    # --- inbound ------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        size = len(msg.payload)
        with self._pub_lock:
            matched = [
                (h, self._limits.get(f))
                for f, handlers in self._subs.items()
                if mqtt.topic_matches_sub(f, msg.topic)
                for h in handlers
            ]
        for handler, limit in matched:
            oversize = limit is not None and size > limit
            kept = 0 if oversize else size
            with self._inbox_lock:
                room = self._inbox_bytes + kept <= self._inbox_max
                if room:
                    self._inbox_bytes += kept
            if room:
                inbound = Inbound(
                    topic=msg.topic,
                    payload=b"" if oversize else bytes(msg.payload),
                    retain=bool(msg.retain),
                    response_topic=getattr(props, "ResponseTopic", None),
                    correlation_data=getattr(props, "CorrelationData", None),
                    user_properties=tuple(getattr(props, "UserProperty", ()) or ()),
                    size=size,
                    oversize=oversize,
                )
                try:
                    self._inbox.put_nowait((handler, inbound))
                    continue
                except queue.Full:
                    with self._inbox_lock:
                        self._inbox_bytes -= kept
            self.dropped_inbound += 1
            if self._due("inbox-full"):
                log.warning(
                    "mqtt: inbound queue full (%d bytes at most), dropped a %d-byte message on %s"
                    " (%d dropped so far)",
                    self._inbox_max,
                    size,
                    msg.topic[:200],
                    self.dropped_inbound,
                )

    def _run_dispatch(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            handler, inbound = item
            try:
                handler(inbound)
            except Exception:
                log.exception("mqtt: handler for %s failed", inbound.topic)
            finally:
                with self._inbox_lock:
                    self._inbox_bytes -= len(inbound.payload)

    # --- spool reports ------------------------------------------------------------------------

    def _spool_dropped(self, kind: Kind, rows: int, records: int) -> None:
        if kind != Kind.FEEDBACK or not self._due("feedback-dropped"):
            return
        total = self.spool.dropped_feedback
        log.warning(
            "spool: dropped %d feedback message(s) to stay within its share (%d dropped so far)",
            rows,
            total,
        )
        self.emit_event(
            "feedback-dropped",
            f"the spool dropped {rows} feedback message(s) to stay within its bound "
            f"({total} so far); the labels were applied on the device",
            level="warning",
            dropped=total,
        )

    def _spool_full(self, refused: int) -> None:
        spool = self.spool
        message = (
            f"the spool holds {spool.size_bytes} bytes of events and metrics, its hard limit is "
            f"{spool.hard_max_bytes}: new ones are refused until the broker takes the backlog"
        )
        log.error("spool: %s", message)
        event = Event(
            device=self.device, kind="spool-full", level="error", message=message,
            details={"refused": refused, "hard_max_bytes": spool.hard_max_bytes},
        )  # fmt: skip
        spool.put(self.topic("events"), msgspec.json.encode(event), force=True)

    def _spool_reset(self, aside: Path, reason: str) -> None:
        self.emit_event(
            "spool-reset",
            f"the spool was unreadable ({reason}); it was moved to {aside.name} and "
            "telemetry continues with an empty one",
            level="error",
            aside=aside.name,
        )

    def _on_command_message(self, msg: Inbound) -> None:
        rest = msg.topic[len(self.prefix) + 1 :].split("/")
        # {device}/cmd/{name...} or groups/{group}/{name...}
        group = rest[1] if rest[0] == "groups" else None
        name = "/".join(rest[2:])
        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            args = msgspec.json.decode(msg.payload) if msg.payload.strip() else {}
            if not isinstance(args, dict):
                raise InferdError("the command body must be a JSON object")
            handler = self._commands.get(name)
            if handler is None:
                raise InferdError(f"unknown command {name!r}")
            result = handler(Command(name, args, msg.topic, group, msg.retain))
        except msgspec.DecodeError as err:
            error = f"invalid JSON: {err}"
        except (InferdError, msgspec.ValidationError, ValueError) as err:
            error = str(err)
        except Exception as err:
            log.exception("mqtt: command %s failed", name)
            error = f"internal error: {type(err).__name__}"
        if error is not None:
            self.emit_event("command-failed", f"{name}: {error}", level="warning", topic=msg.topic)
        if msg.response_topic:
            reply = CommandReply(
                device=self.device, command=name, ok=error is None, error=error, result=result
            )
            self.send_reply(
                msg.response_topic,
                msgspec.json.encode(reply),
                correlation_data=msg.correlation_data,
            )


def _network_thread_writes(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's register-write hook: nothing to register, the network thread's loop() writes."""


def _reason(err: BaseException) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({err.verify_message})"
    if isinstance(err, ssl.SSLError):
        return f"TLS handshake failed ({err.reason or err})"
    if isinstance(err, socket.gaierror):
        return f"unknown host ({err.strerror})"
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


__all__ = [
    "Command",
    "CommandHandler",
    "Handler",
    "Inbound",
    "MqttLink",
    "backoff_delay",
    "broker_options",
]
