"""The broker options every ``inferctl`` command shares, and the client options they make.

``--broker [mqtt[s]://]HOST[:PORT]`` (several nodes of a cluster: comma-separated, tried in
order, the next one taken when a connection is lost), ``--prefix``, ``--protocol``, ``--username``,
``--password-file`` (or the environment variable ``INFERD_MQTT_PASSWORD``; never a password on
the command line, where ``ps`` shows it), ``--ca-file``, ``--cert-file``, ``--key-file``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from pathlib import Path

from runtime.errors import MqttError
from telemetry.broker import DEFAULT_BROKER, PASSWORD_ENV, PROTOCOLS, BrokerOptions, parse_brokers


def add_broker_args(parser: argparse.ArgumentParser, default: str | None = DEFAULT_BROKER) -> None:
    """Add the broker options every operator command shares (see the module docstring).

    ``default=None`` makes ``--broker`` optional (``args.broker`` is then None when not given).
    """
    # No abbreviations: "--password SECRET" would otherwise be taken for --password-file.
    parser.allow_abbrev = False
    g = parser.add_argument_group("broker")
    g.add_argument(
        "--broker",
        default=default,
        metavar="[mqtts://]HOST[:PORT][,...]",
        help="MQTT broker, or the nodes of a cluster comma-separated; mqtts:// or a CA/cert "
        "file means TLS (port 8883 unless given)" + (" (default %(default)s)" if default else ""),
    )
    g.add_argument("--prefix", default="inferd", help="topic prefix (mqtt.topic_prefix)")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default="5", help="MQTT version")
    g.add_argument("--username")
    g.add_argument(
        "--password-file",
        metavar="FILE",
        help=f"file holding the password (else ${PASSWORD_ENV}, if set)",
    )
    g.add_argument("--ca-file", help="CA certificates to trust (TLS)")
    g.add_argument("--cert-file", help="client certificate (TLS)")
    g.add_argument("--key-file", help="client key (TLS)")


def broker_from_args(
    args: argparse.Namespace, client: str = "inferctl", environ: Mapping[str, str] = os.environ
) -> BrokerOptions:
    """The :class:`BrokerOptions` of a command that took :func:`add_broker_args`."""
    nodes, tls = parse_brokers(args.broker)
    password = environ.get(PASSWORD_ENV)
    if args.password_file:
        if args.username is None:
            raise MqttError("--password-file needs --username")
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise MqttError(f"--password-file {args.password_file}: {err.strerror}") from err
    tls = tls or bool(args.ca_file or args.cert_file)
    hosts = tuple((host, port or (8883 if tls else 1883)) for host, port in nodes)
    return BrokerOptions(
        host=hosts[0][0],
        port=hosts[0][1],
        hosts=hosts if len(hosts) > 1 else (),
        protocol=args.protocol,
        client_id=f"{client}-{os.getpid()}-{int(time.time() * 1000) % 10**6}",
        username=args.username,
        password=password if args.username is not None else None,
        tls=tls,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
    )
