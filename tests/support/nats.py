"""A private nats-server cluster on loopback with an MQTT listener per node, ended by pid.

NATS's MQTT gateway (2.9 here) speaks MQTT 3.1.1 only, QoS 0 and 1, keeps sessions and
retained messages in JetStream, and so needs JetStream on and a ``server_name`` per node. Three
nodes are the smallest cluster whose JetStream keeps a quorum when one of them dies.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.net import end_process, free_port, wait_serving
from tests.support.waits import wait_notified

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


@dataclass
class NatsNode:
    """One cluster member: its ports, config, log and process."""

    name: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    monitor_port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"

    @property
    def port(self) -> int:
        """The MQTT port (what a device or an operator tool connects to)."""
        return self.mqtt_port

    @property
    def where(self) -> str:
        return f"{self.host}:{self.mqtt_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.alive
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT
            )

    def log_tail(self) -> str:
        """The last 3000 characters of the node's log."""
        return self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """End the node abruptly (SIGKILL): no goodbye to any client or route."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            end_process(self.proc, sig, grace=10)


class NatsCluster:
    """``size`` nats-server processes routed to each other, JetStream and MQTT on every one."""

    def __init__(
        self, workdir: Path, size: int = 3, cluster_name: str = "inferd-test", mqtt_extra: str = ""
    ) -> None:
        """``mqtt_extra``: more settings of the ``mqtt`` block (``consumer_replicas: 1``)."""
        self.workdir = workdir
        self.nodes: list[NatsNode] = []
        ports = [(free_port(), free_port(), free_port(), free_port()) for _ in range(size)]
        extra = f", {mqtt_extra}" if mqtt_extra else ""
        routes = ", ".join(f"nats-route://127.0.0.1:{p[1]}" for p in ports)
        for i, (client, cluster, mqtt_port, monitor) in enumerate(ports):
            name = f"n{i + 1}"
            store = workdir / f"nats-{name}"
            store.mkdir(parents=True, exist_ok=True)
            conf = workdir / f"nats-{name}.conf"
            # one node alone is a plain server: a cluster block would wait for peers
            routing = (
                f'cluster {{ name: "{cluster_name}", listen: 127.0.0.1:{cluster}, '
                f"routes: [{routes}] }}\n"
                if size > 1
                else ""
            )
            conf.write_text(
                f'server_name: "{name}"\n'
                f"listen: 127.0.0.1:{client}\n"
                f"http: 127.0.0.1:{monitor}\n"
                f'jetstream {{ store_dir: "{store}", max_memory_store: 64MB, '
                f"max_file_store: 256MB }}\n"
                f"{routing}"
                f"mqtt {{ listen: 127.0.0.1:{mqtt_port}{extra} }}\n",
                encoding="utf-8",
            )
            self.nodes.append(
                NatsNode(name, client, cluster, mqtt_port, monitor, conf, workdir / f"{name}.log")
            )

    def start(self, timeout: float = 30.0) -> None:
        """Start every node and wait until each one's MQTT listener completes a session."""
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            assert node.proc is not None
            try:
                wait_serving(
                    node.proc,
                    functools.partial(mqtt_ready, node.host, node.mqtt_port),
                    f"nats-server {node.name} (MQTT)",
                    max(deadline - time.monotonic(), 0.0),
                    node.log_tail,
                    interval=0.2,
                )
            except AssertionError:
                self.kill()
                raise

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def node_at(self, where: str) -> NatsNode:
        """The node whose MQTT listener is ``host:port``."""
        for node in self.nodes:
            if node.where == where:
                return node
        raise KeyError(where)


def mqtt_ready(host: str, port: int) -> bool:
    """True once ``host:port`` accepts an MQTT 3.1.1 CONNECT (on NATS: its JetStream assets exist).

    A raw CONNECT/CONNACK exchange: NATS answers only once the account's MQTT streams are
    made, which in a cluster waits for a JetStream meta leader.
    """
    client_id = b"ready-probe"
    var = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol level 4, clean session, keepalive 10
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = var + payload
    packet = b"\x10" + bytes([len(body)]) + body
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(packet)
            s.settimeout(3)
            reply = s.recv(4)
            s.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return False
    return len(reply) == 4 and reply[0] == 0x20 and reply[3] == 0


@dataclass
class Seen:
    topic: str
    payload: bytes
    retain: bool


class Watcher:
    """An MQTT 3.1.1 subscriber (what a dashboard on a NATS node is) recording what arrives."""

    def __init__(self, host: str, port: int, *topics: str) -> None:
        self.messages: list[Seen] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"watch-{os.getpid()}-{id(self)}",
            protocol=mqtt.MQTTv311,
        )
        wanted = list(topics) or ["#"]

        def on_connect(c: mqtt.Client, *_: object) -> None:
            c.subscribe([(t, 1) for t in wanted])

        def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
            with self._cond:
                self.messages.append(Seen(msg.topic, bytes(msg.payload), bool(msg.retain)))
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = on_message
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError(f"no SUBACK from {host}:{port}")

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        return wait_notified(self._cond, predicate, timeout)

    def on(self, suffix: str) -> list[Seen]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
