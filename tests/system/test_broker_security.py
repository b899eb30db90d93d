"""The example broker security config (``examples/mosquitto/``) against a real mosquitto.

The broker runs the example ``mosquitto.conf`` with only its paths and ports replaced (and its
listeners bound to loopback), with the example ACL file itself; the certificates are made here.
A message that must not arrive is looked for only after a later one on the same path did
arrive: the broker keeps the order of what it routes to a connection, so the absence means the
broker dropped it, not that the test stopped waiting too early.
"""

from __future__ import annotations

import getpass
import json
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from telemetry.broker import BrokerOptions, make_client
from tests.support.broker import Broker
from tests.support.daemon import DaemonProc
from tests.support.net import free_port
from tests.support.pki import Issued, Pki

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
USERS = ("pi-kitchen-01", "jetson-yard-02", "operator", "telegraf", "app-frontdoor")
DEVICE = "pi-kitchen-01"
NOT_AUTHORIZED = 0x87
WAIT = 5.0
"""Bound for what must arrive (it takes milliseconds); never spent on what must not."""


class ExampleBroker(Broker):
    """mosquitto on ``examples/mosquitto/mosquitto.conf`` with a fresh PKI and password file.

    ``port`` is the plain loopback listener (1883 in the example), ``tls_port`` the
    username/password TLS listener (8883), ``cert_port`` the client-certificate one (8884).
    """

    def __init__(self, workdir: Path, pki: Pki) -> None:
        super().__init__(workdir)
        self.tls_port, self.cert_port = free_port(), free_port()
        self.ca = pki.ca("fleet-ca")
        server = pki.server(self.ca, "broker")
        self.device_cert = pki.client(self.ca, DEVICE)
        # an impostor: the device's name, signed by a CA the broker does not trust
        self.other_ca = pki.ca("other-ca")
        self.foreign_cert = pki.client(self.other_ca, DEVICE)

        acl = EXAMPLE / "inferd.acl"
        named = set(re.findall(r"^user (\S+)$", acl.read_text(encoding="utf-8"), re.MULTILINE))
        assert named == set(USERS), f"{acl} names the users {sorted(named)}"
        self.passwords = {user: secrets.token_urlsafe(12) for user in USERS}
        passwd = workdir / "passwd"
        for i, (user, password) in enumerate(self.passwords.items()):
            create = ["-c"] if i == 0 else []
            subprocess.run(
                [MOSQUITTO_PASSWD, *create, "-b", str(passwd), user, password], check=True
            )

        replace = {
            "listener 8883\n": f"listener {self.tls_port} 127.0.0.1\n",
            "listener 8884\n": f"listener {self.cert_port} 127.0.0.1\n",
            "listener 1883 127.0.0.1\n": f"listener {self.port} 127.0.0.1\n",
            "/etc/mosquitto/certs/ca.crt": str(self.ca.cert_file),
            "/etc/mosquitto/certs/broker.crt": str(server.cert_file),
            "/etc/mosquitto/certs/broker.key": str(server.key_file),
            "/etc/mosquitto/passwd": str(passwd),
            "/etc/mosquitto/inferd.acl": str(acl),
            "/var/lib/mosquitto/": f"{workdir}/",
        }
        text = (EXAMPLE / "mosquitto.conf").read_text(encoding="utf-8")
        for old, new in replace.items():
            assert old in text, f"examples/mosquitto/mosquitto.conf no longer has {old!r}"
            text = text.replace(old, new)
        # Replaces the config Broker wrote. Started as root, mosquitto would switch to the user
        # "mosquitto", who cannot read pytest's tmp dir or the keys in it.
        self.conf.write_text(f"user {getpass.getuser()}\n{text}", encoding="utf-8")

    def options(
        self,
        user: str | None = None,
        *,
        password: str | None = None,
        port: int | None = None,
        cert: Issued | None = None,
        ca: Issued | None = None,
    ) -> BrokerOptions:
        """How a client connects: as ``user`` (its password unless one is given), over TLS
        unless ``port`` is the plain one, presenting ``cert`` and trusting ``ca`` (the fleet's)."""
        port = port or self.tls_port
        return BrokerOptions(
            host=self.host,
            port=port,
            client_id=f"test-{uuid.uuid4().hex[:12]}",
            username=user,
            password=password or (self.passwords[user] if user else None),
            tls=port != self.port,
            ca_file=str((ca or self.ca).cert_file),
            cert_file=str(cert.cert_file) if cert else None,
            key_file=str(cert.key_file) if cert else None,
            keepalive_s=10,
        )

    def password_file(self, user: str) -> Path:
        path = self.workdir / f"{user}.password"
        path.write_text(self.passwords[user] + "\n", encoding="utf-8")
        path.chmod(0o600)
        return path


class Peer:
    """An MQTT 5 client of the broker: its connection outcome, what it received, its acks."""

    def __init__(self, opts: BrokerOptions) -> None:
        self.cond = threading.Condition()
        self.connack: ReasonCode | None = None
        self.refusal: str | None = None
        self.received: list[tuple[str, bytes, Any]] = []
        self.acks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.errors: list[str] = []
        self.client = make_client(opts)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_log = self._on_log
        try:
            self.client.connect(opts.host, opts.port, keepalive=opts.keepalive_s)
        except OSError as err:  # ssl.SSLError included: a handshake refused either way
            self.refusal = f"{type(err).__name__}: {err}"
            return
        self.client.loop_start()
        # TLS 1.3 checks the client certificate after the client's handshake is done: a refusal
        # then comes as the connection closing instead of a CONNACK.
        assert self.wait(lambda: self.connack is not None or self.refusal is not None)

    @property
    def connected(self) -> bool:
        return self.connack is not None and self.refusal is None

    def _refused(self, client: mqtt.Client, why: str) -> None:
        with self.cond:
            self.refusal = why
            self.cond.notify_all()
        # Called on the loop's thread this ends the loop: no reconnect, and no 1 s reconnect
        # delay for close() to wait out.
        client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused(client, str(reason))
            return
        with self.cond:
            self.connack = reason
            self.cond.notify_all()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self.refusal is None and self.connack is None:
            why = self.errors[-1] if self.errors else str(reason)
            self._refused(client, f"connection closed before CONNACK: {why}")

    def _on_log(self, client: Any, userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:  # paho's only word on a TLS alert after the handshake
            with self.cond:
                self.errors.append(text)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.received.append((msg.topic, bytes(msg.payload), msg.properties))
            self.cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self.cond:
            self.acks[mid] = reason
            self.cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self.cond:
            self.subacks[mid] = list(reasons)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def subscribe(self, topic_filter: str) -> ReasonCode:
        """Subscribe (QoS 1); returns the SUBACK's reason code once it is there."""
        rc, mid = self.client.subscribe(topic_filter, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None, rc
        assert self.wait(lambda: mid in self.subacks), f"no SUBACK for {topic_filter}"
        return self.subacks[mid][0]

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, props: Properties | None = None
    ) -> ReasonCode:
        """Publish with QoS 1; returns the PUBACK's reason code once the broker has answered."""
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        assert self.wait(lambda: info.mid in self.acks), f"no PUBACK for {topic}"
        return self.acks[info.mid]

    def topics_with(self, payload: bytes) -> list[str]:
        with self.cond:
            return [topic for topic, body, _ in self.received if body == payload]

    def has(self, topic: str, payload: bytes) -> bool:
        return self.wait(lambda: topic in self.topics_with(payload))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[ExampleBroker]:
    """One broker for the module: the config under test does not change between tests."""
    b = ExampleBroker(tmp_path_factory.mktemp("broker"), pki)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def connect(fleet: ExampleBroker) -> Iterator[Callable[..., Peer]]:
    """``connect(user, *filters, **options)``: a connected :class:`Peer`, subscribed in order."""
    made: list[Peer] = []

    def make(user: str | None, *filters: str, **options: Any) -> Peer:
        peer = Peer(fleet.options(user, **options))
        made.append(peer)
        assert peer.connected, f"{user} refused: {peer.refusal}"
        for topic_filter in filters:
            assert not peer.subscribe(topic_filter).is_failure, topic_filter
        return peer

    yield make
    for peer in made:
        peer.close()


def token() -> bytes:
    return uuid.uuid4().hex.encode()


# --- the ACL --------------------------------------------------------------------------------


def test_a_device_writes_only_what_it_publishes(connect: Callable[..., Peer]) -> None:
    operator = connect("operator", "inferd/#")
    device = connect(DEVICE)
    mark = token()
    refused = (
        "inferd/jetson-yard-02/status",
        "inferd/groups/kitchen/update",
        # its own commands and requests: a device tricked into publishing there (the reply of
        # issue 13's deputy attack) cannot command itself
        f"inferd/{DEVICE}/cmd/rollback",
        f"inferd/{DEVICE}/infer/clf",
        f"inferd/{DEVICE}/anything-else",
        "replies/app-frontdoor",
    )
    for topic in refused:
        assert device.publish(topic, mark).value == NOT_AUTHORIZED, topic
    own = [
        f"inferd/{DEVICE}/{leaf}"
        for leaf in ("status", "metrics", "predictions", "events", "quality", "feedback")
    ]
    own += [f"inferd/{DEVICE}/infer/clf/reply", f"inferd/{DEVICE}/infer/clf/reply/app-frontdoor"]
    for topic in own:
        assert not device.publish(topic, mark).is_failure, topic
    assert operator.wait(lambda: len(operator.topics_with(mark)) == len(own))
    assert operator.topics_with(mark) == own


def test_a_device_reads_only_its_own_and_its_groups_commands(
    connect: Callable[..., Peer],
) -> None:
    operator = connect("operator")
    mark = token()
    # Group pokes are retained: the ones waiting when the device subscribes go through the ACL too.
    poke_yard, poke_kitchen = "inferd/groups/yard/update", "inferd/groups/kitchen/update"
    for topic in (poke_yard, poke_kitchen):
        assert not operator.publish(topic, mark, retain=True).is_failure
    device = connect(DEVICE)
    # An agent subscribes to its cmd/# and its groups; a curious one to everything. Whether the
    # broker refuses a foreign filter or accepts it and filters delivery, nothing may arrive.
    for topic_filter in (
        "inferd/#",
        "inferd/jetson-yard-02/cmd/#",
        "inferd/groups/yard/#",
        f"inferd/{DEVICE}/cmd/#",
        "inferd/groups/kitchen/#",
    ):
        device.subscribe(topic_filter)
    assert device.has(poke_kitchen, mark)
    assert poke_yard not in device.topics_with(mark)

    live = token()
    foreign = ("inferd/jetson-yard-02/cmd/x", poke_yard)
    own = (f"inferd/{DEVICE}/cmd/x", poke_kitchen)
    for topic in (*foreign, *own):
        assert not operator.publish(topic, live).is_failure
    assert device.wait(lambda: set(own) <= set(device.topics_with(live)))
    assert not set(foreign) & set(device.topics_with(live))
    for topic in (poke_yard, poke_kitchen):  # the broker is shared by this module's tests
        operator.publish(topic, b"", retain=True)


def test_telegraf_reads_telemetry_and_cannot_send_commands(connect: Callable[..., Peer]) -> None:
    telegraf = connect("telegraf", "inferd/+/metrics")
    device = connect(DEVICE, f"inferd/{DEVICE}/cmd/#", "inferd/groups/kitchen/#")
    operator = connect("operator")
    mark = token()
    assert not device.publish(f"inferd/{DEVICE}/metrics", mark).is_failure
    assert telegraf.has(f"inferd/{DEVICE}/metrics", mark)
    for command in (f"inferd/{DEVICE}/cmd/rollback", "inferd/groups/kitchen/update"):
        assert telegraf.publish(command, mark).value == NOT_AUTHORIZED, command
    # The broker had answered those before the operator's command was sent: had it routed
    # them, the device would have them before this one.
    allowed = f"inferd/{DEVICE}/cmd/check-update"
    assert not operator.publish(allowed, mark).is_failure
    assert device.has(allowed, mark)
    assert device.topics_with(mark) == [allowed]


# --- TLS and authentication -----------------------------------------------------------------


def test_on_the_certificate_listener_the_certificate_is_the_identity(
    fleet: ExampleBroker, connect: Callable[..., Peer]
) -> None:
    operator = connect("operator", "inferd/#")
    # It claims another device's name, with a wrong password: only the certificate's CN counts.
    device = connect(
        "jetson-yard-02", password="wrong", port=fleet.cert_port, cert=fleet.device_cert
    )
    mark = token()
    assert device.publish("inferd/jetson-yard-02/status", mark).value == NOT_AUTHORIZED
    assert not device.publish(f"inferd/{DEVICE}/status", mark).is_failure
    assert operator.has(f"inferd/{DEVICE}/status", mark)
    assert operator.topics_with(mark) == [f"inferd/{DEVICE}/status"]


# (how the client connects, why it is refused): "broker: ..." is the broker's log, for the TLS
# 1.3 case where the broker checks the client certificate after the client's handshake is done
# and the client only sees the connection close.
REFUSED: dict[str, tuple[Callable[[ExampleBroker], BrokerOptions], str]] = {
    "wrong password": (
        lambda b: b.options("operator", password="not-the-password"),
        "Not authorized",
    ),
    "no credentials over TLS": (lambda b: b.options(), "Not authorized"),
    "no credentials on loopback": (lambda b: b.options(port=b.port), "Not authorized"),
    "broker certificate from a CA the client does not trust": (
        lambda b: b.options("operator", ca=b.other_ca),
        "certificate verify failed",
    ),
    "client certificate from another CA": (
        lambda b: b.options(port=b.cert_port, cert=b.foreign_cert),
        "broker: certificate verify failed",
    ),
    "no client certificate, right password": (
        lambda b: b.options("operator", port=b.cert_port),
        "broker: peer did not return a certificate",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused(case: str, fleet: ExampleBroker) -> None:
    options, reason = REFUSED[case]
    log_start = fleet.log.stat().st_size
    peer = Peer(options(fleet))
    try:
        assert not peer.connected
        assert peer.refusal is not None
        if reason.startswith("broker: "):
            said = fleet.log.read_bytes()[log_start:].decode(errors="replace")
            assert reason.removeprefix("broker: ") in said, said
        else:
            assert reason in peer.refusal, peer.refusal
    finally:
        peer.close()


# --- a real daemon --------------------------------------------------------------------------


def daemon_config(model: Path, port: int, **mqtt_extra: Any) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "groups": ["kitchen"],
        "models": [{"name": "clf", "path": str(model)}],
        "mqtt": {
            "enabled": True,
            "host": "127.0.0.1",
            "port": port,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            **mqtt_extra,
        },
        "updates": {"enabled": False},
    }


def status_states(peer: Peer) -> list[str]:
    with peer.cond:
        bodies = [body for topic, body, _ in peer.received if topic == f"inferd/{DEVICE}/status"]
    return [json.loads(body).get("state") for body in bodies if body.startswith(b"{")]


def inferctl_watch(broker: str, *options: str) -> subprocess.CompletedProcess[str]:
    """``inferctl watch --json`` against ``broker``, as an operator runs it."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "updater.inferctl",
            "watch",
            "--broker",
            broker,
            *options,
            "--json",
            "--wait",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_daemon_with_a_client_certificate_is_online_for_operators_and_applications(
    fleet: ExampleBroker,
    connect: Callable[..., Peer],
    inferd_daemon: Callable[..., DaemonProc],
    model_factory: Callable[..., Path],
) -> None:
    tls = {
        "ca_file": str(fleet.ca.cert_file),
        "cert_file": str(fleet.device_cert.cert_file),
        "key_file": str(fleet.device_cert.key_file),
    }
    daemon = inferd_daemon(daemon_config(model_factory("classifier"), fleet.cert_port, tls=tls))
    operator = connect("operator", f"inferd/{DEVICE}/status")
    assert operator.wait(lambda: "online" in status_states(operator)), daemon.stderr()

    watch = inferctl_watch(
        f"mqtts://127.0.0.1:{fleet.tls_port}",
        "--ca-file",
        str(fleet.ca.cert_file),
        "--username",
        "operator",
        "--password-file",
        str(fleet.password_file("operator")),
    )
    assert watch.returncode == 0, watch.stderr
    rows = {row["device"]: row for row in json.loads(watch.stdout)}
    assert rows[DEVICE]["online"] is True and "clf" in rows[DEVICE]["models"], rows

    # An application asks for the reply under the device's prefix, as the ACL file advises.
    reply = f"inferd/{DEVICE}/infer/clf/reply/app-frontdoor"
    app = connect("app-frontdoor", reply)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = reply
    props.CorrelationData = b"q1"
    request = {"id": "q1", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                       "data": [0.1] * 4}]}  # fmt: skip
    body = json.dumps(request).encode()
    assert not app.publish(f"inferd/{DEVICE}/infer/clf", body, props=props).is_failure
    assert app.wait(lambda: any(topic == reply for topic, _, _ in app.received)), daemon.stderr()
    _, answer, answer_props = next(m for m in app.received if m[0] == reply)
    assert ("status", "200") in answer_props.UserProperty
    assert json.loads(answer)["outputs"][0]["shape"] == [1, 3]

    # Issue 13's deputy attack with the shipped ACL: the reply aimed at the device's own
    # cmd/rollback is published neither by the device nor (were it tricked) let through.
    watcher = connect("operator", f"inferd/{DEVICE}/cmd/#")
    deputy = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    deputy.ResponseTopic = f"inferd/{DEVICE}/cmd/rollback"
    deputy.CorrelationData = b"q2"
    assert not app.publish(f"inferd/{DEVICE}/infer/clf", b'{"inputs": []}', props=deputy).value
    props.CorrelationData = b"q3"
    assert not app.publish(f"inferd/{DEVICE}/infer/clf", body, props=props).is_failure
    assert app.wait(lambda: len([m for m in app.received if m[0] == reply]) == 2)
    assert watcher.received == [], watcher.received
    assert f"refused to reply on 'inferd/{DEVICE}/cmd/rollback'" in daemon.stderr()


def test_daemon_with_a_wrong_password_keeps_serving_and_says_so_once(
    fleet: ExampleBroker,
    inferd_daemon: Callable[..., DaemonProc],
    model_factory: Callable[..., Path],
    tmp_path: Path,
) -> None:
    wrong = tmp_path / "mqtt.password"
    wrong.write_text("not-the-password\n", encoding="utf-8")
    tls = {
        "ca_file": str(fleet.ca.cert_file),
        "cert_file": str(fleet.device_cert.cert_file),
        "key_file": str(fleet.device_cert.key_file),
    }
    daemon = inferd_daemon(
        daemon_config(
            model_factory("classifier"),
            fleet.tls_port,
            tls=tls,
            username=DEVICE,
            password_file=str(wrong),
        )
    )

    def mqtt_errors() -> list[str]:
        return [ln for ln in daemon.stderr().splitlines() if "ERROR" in ln and "mqtt" in ln]

    deadline = time.monotonic() + WAIT
    while not mqtt_errors() and time.monotonic() < deadline:
        time.sleep(0.05)
    # It retries every 0.25-0.5 s: a second of serving spans several refused attempts.
    x = [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1] * 4}]
    served = time.monotonic() + 1.0
    while time.monotonic() < served:
        status, body = daemon.infer("clf", x)
        assert status == 200, body
        time.sleep(0.05)
    lines = mqtt_errors()
    assert len(lines) == 1, daemon.stderr()
    assert "refused" in lines[0] and "password" in lines[0], lines[0]
    assert "not-the-password" not in daemon.stderr()


def test_inferctl_says_why_a_certificate_listener_closed_on_it(fleet: ExampleBroker) -> None:
    """Under TLS 1.3 a refused client certificate is a closed connection, not a CONNACK:
    the operator hears that, rather than a generic "no answer" after the timeout."""
    watch = inferctl_watch(
        f"mqtts://127.0.0.1:{fleet.cert_port}",
        "--ca-file",
        str(fleet.ca.cert_file),
        "--cert-file",
        str(fleet.foreign_cert.cert_file),
        "--key-file",
        str(fleet.foreign_cert.key_file),
    )
    assert watch.returncode == 1
    assert "connection closed before the broker answered" in watch.stderr, watch.stderr
    assert "Traceback" not in watch.stderr
