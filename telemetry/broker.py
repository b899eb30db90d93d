"""Building a configured paho-mqtt client: protocol, credentials and TLS in one place.

Used by the agent's link (``agent/mqtt.py``) and by ``inferctl watch``; each process still has
exactly one client. TLS files are loaded here, so a missing or malformed file is one
:class:`MqttError` line naming the file, before any connection is tried.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from telemetry.errors import MqttError

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


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

    def __repr__(self) -> str:
        return f"BrokerOptions(host={self.host!r}, port={self.port}, tls={self.tls})"

    @property
    def where(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


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
        clean_session=True if protocol == mqtt.MQTTv311 else None,
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
