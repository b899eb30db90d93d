"""Building a configured paho-mqtt client: protocol, credentials and TLS in one place.

Used by the agent's link (``agent/mqtt.py``) and by every operator command that talks to the
broker (``inferctl watch``, ``push``, ``status``, ``rollout``, ``collect``); each process still
has exactly one client. TLS files are loaded here, so a missing or malformed file is one
:class:`MqttError` line naming the file, before any connection is tried.

Operator commands take the same broker options through :func:`add_broker_args` and turn them
into :class:`BrokerOptions` with :func:`broker_from_args`: ``--broker [mqtt[s]://]HOST[:PORT]``
(or a comma-separated list of the nodes of a cluster), ``--prefix``, ``--protocol``,
``--username``, ``--password-file`` (or the environment variable ``INFERD_MQTT_PASSWORD``; never
a password on the command line, where ``ps`` shows it), ``--ca-file``, ``--cert-file``,
``--key-file``.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from runtime.errors import MqttError

log = logging.getLogger(__name__)

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
PASSWORD_ENV = "INFERD_MQTT_PASSWORD"  # noqa: S105 - where the password is, not one
DEFAULT_BROKER = "127.0.0.1:1883"
V5_REFUSED = "Unsupported protocol version"
"""How paho reads the CONNACK of a 3.1.1-only broker (NATS) to an MQTT 5 CONNECT."""
UNANSWERED = "connection closed before the broker answered"
"""A TLS refusal, or RabbitMQ 3.x's answer to an MQTT 5 CONNECT."""


@dataclass(frozen=True)
class BrokerOptions:
    """Where and how to connect; ``password`` never appears in repr."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive_s: int = 30
    hosts: tuple[tuple[str, int], ...] = ()
    """Every node of a clustered broker, in the order to try them; empty: ``host``/``port``."""
    session_expiry_s: int = 0
    """0: a session that ends with the connection. Above 0: a persistent session under
    ``client_id`` that the broker keeps this long after a disconnect (in 3.1.1, which has no
    expiry, a ``clean_session`` false one, kept as long as the broker chooses)."""

    def __repr__(self) -> str:
        return f"BrokerOptions(host={self.host!r}, port={self.port}, tls={self.tls})"

    @property
    def where(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]:
        """The (host, port) of every node to try, in order."""
        return self.hosts or ((self.host, self.port),)

    def at(self, node: tuple[str, int]) -> BrokerOptions:
        """These options aimed at one node (``host``, ``port`` and ``where`` name it)."""
        return replace(self, host=node[0], port=node[1])


def make_client(opts: BrokerOptions) -> mqtt.Client:
    """A paho v2-API client set up from ``opts``; MqttError when TLS files cannot be loaded."""
    try:
        protocol = PROTOCOLS[opts.protocol]
    except KeyError:
        raise MqttError(f"mqtt protocol {opts.protocol!r} is not one of 5, 3.1.1") from None
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=opts.client_id,
        protocol=protocol,
        clean_session=opts.session_expiry_s == 0 if protocol == mqtt.MQTTv311 else None,
    )
    if opts.username is not None:
        client.username_pw_set(opts.username, opts.password)
    if opts.tls:
        client.tls_set_context(tls_context(opts))
        if opts.tls_insecure:
            client.tls_insecure_set(True)
    return client


def tls_context(opts: BrokerOptions) -> ssl.SSLContext:
    """A client TLS context with the CA and the client certificate of ``opts`` loaded."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if opts.tls_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    what = "ca_file"
    try:
        if opts.ca_file is not None:
            ctx.load_verify_locations(cafile=opts.ca_file)
        if opts.cert_file is not None:
            what = "cert_file/key_file"
            ctx.load_cert_chain(opts.cert_file, opts.key_file)
    except FileNotFoundError as err:
        raise MqttError(f"mqtt.tls.{what}: {err.filename or 'file'} not found") from err
    except (ssl.SSLError, OSError, ValueError) as err:
        files = opts.ca_file if what == "ca_file" else f"{opts.cert_file}, {opts.key_file}"
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or str(err)
        raise MqttError(f"mqtt.tls.{what}: cannot load {files}: {reason}") from err
    return ctx


# --- operator commands ------------------------------------------------------------------------


def parse_node(text: str) -> tuple[str, int | None] | None:
    """``HOST[:PORT]`` (IPv6 in brackets, or bare) -> (host, port or None); None if malformed."""
    host, port = text, ""
    if text.startswith("["):  # [::1]:1883
        host, _, tail = text[1:].partition("]")
        port = tail.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host or (port and not port.isdigit()) or not 0 < int(port or 1) < 65536:
        return None
    return host, int(port) if port else None


def parse_broker(text: str) -> tuple[str, int | None, bool]:
    """``[mqtt[s]://]HOST[:PORT]`` (IPv6 in brackets) -> (host, port or None, TLS asked for)."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    elif scheme not in ("mqtt", "mqtts"):
        raise MqttError(f"--broker {text}: the scheme must be mqtt:// or mqtts://")
    node = parse_node(rest)
    if node is None:
        raise MqttError(f"--broker {text}: expected [mqtts://]HOST[:PORT]")
    return node[0], node[1], scheme == "mqtts"


def parse_brokers(text: str) -> tuple[list[tuple[str, int | None]], bool]:
    """``--broker`` with one node or a comma-separated list -> ([(host, port or None)], TLS)."""
    nodes: list[tuple[str, int | None]] = []
    tls = False
    for part in text.split(","):
        host, port, part_tls = parse_broker(part.strip())
        nodes.append((host, port))
        tls = tls or part_tls
    return nodes, tls


def connect(
    opts: BrokerOptions,
    *,
    subscriptions: Iterable[tuple[str, int]] = (),
    on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None = None,
    on_subscribe: Callable[..., None] | None = None,
    timeout: float = 10.0,
) -> mqtt.Client:
    """A connected client with its network loop running; MqttError when refused or unreachable.

    ``subscriptions`` (filter, qos) are made on every (re)connect, after ``on_message`` is set,
    so retained messages they bring are not missed; ``on_subscribe`` (paho's callback) hears
    each one acknowledged or refused. With several nodes (``opts.hosts``) the
    first that answers is used, and a lost connection is retried on the next one, round-robin.
    A broker that refuses MQTT 5 (a 3.1.1-only one: NATS, RabbitMQ) is asked again in 3.1.1.
    """
    subscriptions = list(subscriptions)
    nodes = opts.nodes
    errors: list[str] = []
    for i, node in enumerate(nodes):
        for protocol in dict.fromkeys((opts.protocol, "3.1.1")):
            try:
                client = _connect_node(
                    replace(opts.at(node), protocol=protocol),
                    subscriptions,
                    on_message,
                    on_subscribe,
                    timeout,
                    nodes[i + 1 :] + nodes[: i + 1],
                )
            except MqttError as err:
                # NATS refuses MQTT 5 with a return code; RabbitMQ 3.x closes the connection
                if protocol == "5" and (V5_REFUSED in str(err) or UNANSWERED in str(err)):
                    log.info("broker %s refused MQTT 5; trying 3.1.1", opts.at(node).where)
                    continue
                errors.append(str(err))
                break
            return client
    if len(errors) == 1:
        raise MqttError(errors[0])
    raise MqttError("no broker node answered: " + "; ".join(errors))


def _connect_node(
    opts: BrokerOptions,
    subscriptions: list[tuple[str, int]],
    on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None,
    on_subscribe: Callable[..., None] | None,
    timeout: float,
    rotation: tuple[tuple[str, int], ...],
) -> mqtt.Client:
    """``connect`` to ``opts.host``; after a loss paho reconnects to the next of ``rotation``."""
    client = make_client(opts)
    filters = list(subscriptions)
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            refused.append(str(reason))
        else:
            for topic, qos in filters:
                c.subscribe(topic, qos=qos)
        connected.set()

    turn = [0]

    def advance(c: mqtt.Client, _u: Any = None) -> None:
        # paho's loop reconnects to the client's host and port: aim them at the next node. The
        # public setters refuse while the lost connection is being torn down (the state is
        # "connection lost", not "disconnected"), which is exactly when this runs.
        if len(rotation) > 1:
            c._host, c._port = rotation[turn[0] % len(rotation)]
            turn[0] += 1

    def on_disconnect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        # Under TLS 1.3 a broker that rejects the client certificate just closes the
        # connection: no CONNACK ever comes, so say so now instead of after the timeout.
        if not connected.is_set():
            refused.append(f"{UNANSWERED} ({reason})")
            connected.set()
        else:
            advance(c)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_connect_fail = advance
    if on_message is not None:
        client.on_message = on_message
    if on_subscribe is not None:
        client.on_subscribe = on_subscribe
    props = None
    if opts.session_expiry_s and opts.protocol == "5":
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = opts.session_expiry_s
    try:
        if props is not None:  # resume the session kept by the broker, on reconnects too
            client.connect(
                opts.host, opts.port, opts.keepalive_s, clean_start=False, properties=props
            )
        else:
            client.connect(opts.host, opts.port, keepalive=opts.keepalive_s)
    except (OSError, ssl.SSLError) as err:
        raise MqttError(f"cannot reach the broker at {opts.where}: {err.strerror or err}") from err
    if len(rotation) > 1:
        client.reconnect_delay_set(1, 10)
    client.loop_start()
    if not connected.wait(timeout) or refused:
        client.loop_stop()
        why = refused[0] if refused else "no answer"
        raise MqttError(f"broker {opts.where} refused the connection: {why}")
    return client
