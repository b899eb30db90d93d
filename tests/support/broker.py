"""A private mosquitto (free port, config in a given folder, ended by its PID) and a subscriber.

A :class:`Broker` can be stopped, killed and restarted on the same port, with extra config lines
(a password file, TLS, an ACL). A :class:`Cutter` is a TCP proxy whose connections can be cut.
A :class:`Capture` subscribes with its own paho client and collects what arrives.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.net import end_process, free_port, wait_port
from tests.support.waits import wait_notified

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Broker:
    """One mosquitto process; ``stop``/``kill``/``start`` keep the port and config."""

    def __init__(
        self, workdir: Path, extra_config: str = "", port: int | None = None, persist: bool = False
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = workdir
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"
        has_auth = "password_file" in extra_config or "allow_anonymous" in extra_config
        anon = "" if has_auth else "allow_anonymous true\n"
        # Without persistence a restart is a broker that lost everything, the worst case the
        # agent must survive. With it, ``save()`` keeps a Capture's session and subscription
        # across a SIGKILL, so the capture misses nothing the agent sends while it reconnects.
        self.db = workdir / f"mosquitto-{self.port}.db"
        persistence = (
            f"persistence true\npersistence_location {workdir}/\n"
            f"persistence_file {self.db.name}\nmax_queued_messages 0\n"
            if persist
            else "persistence false\n"
        )
        # mosquitto started as root drops to user "mosquitto", which cannot read or write in
        # pytest's private tmp dir; "user" is ignored when it is not started as root.
        self.conf.write_text(
            f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\n"
            f"{anon}{persistence}{extra_config}",
            encoding="utf-8",
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(self.log.read_text(errors="replace")) from None

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            end_process(self.proc, sig)

    def save(self) -> None:
        """Make the broker write its persistence file now (SIGUSR1) and wait for it."""
        assert self.proc is not None
        before = self.db.stat().st_mtime_ns if self.db.exists() else 0
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.db.exists() and self.db.stat().st_mtime_ns != before:
                time.sleep(0.05)
                return
            time.sleep(0.01)
        raise TimeoutError("mosquitto did not save its persistence file")

    def stop(self) -> None:
        """End the broker cleanly (SIGTERM)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """End the broker abruptly (SIGKILL): no goodbye to any client."""
        self._end(signal.SIGKILL)


class Cutter:
    """A TCP proxy in front of a broker whose connections the test can cut abruptly.

    ``cut()`` resets every connection (RST, no goodbye) and refuses new ones until
    ``restore()``: a network outage with messages in flight, while the broker stays up.
    """

    def __init__(self, target: Broker) -> None:
        self.target = (target.host, target.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = "127.0.0.1", self.listener.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.peers: dict[socket.socket, socket.socket] = {}
        self.open = True
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-cutter", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with self.lock:
                    if sock is self.listener:
                        conn, _ = self.listener.accept()
                        if not self.open:
                            self._reset(conn)
                            continue
                        try:
                            upstream = socket.create_connection(self.target)
                        except OSError:  # the broker is down: so is the proxy
                            self._reset(conn)
                            continue
                        for a, b in ((conn, upstream), (upstream, conn)):
                            self.peers[a] = b
                            self.sel.register(a, selectors.EVENT_READ)
                        continue
                    if sock not in self.peers:
                        continue
                    try:
                        data = sock.recv(65536)
                        if data:
                            self.peers[sock].sendall(data)
                            continue
                    except OSError:
                        pass
                    self._drop(sock)

    def _reset(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _drop(self, sock: socket.socket) -> None:
        other = self.peers.pop(sock, None)
        for s in (sock, other):
            if s is None:
                continue
            self.peers.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(s)
            self._reset(s)

    def cut(self) -> None:
        with self.lock:
            self.open = False
            while self.peers:
                self._drop(next(iter(self.peers)))

    def restore(self) -> None:
        with self.lock:
            self.open = True

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.cut()
        self.listener.close()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: object = None
    qos: int = 0


@dataclass
class Capture:
    """A subscriber on its own connection that records every message it gets."""

    host: str
    port: int
    topics: tuple[str, ...] = ("#",)
    messages: list[Received] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"capture-{os.getpid()}-{id(self)}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.subscribed = 0
        self.client.reconnect_delay_set(0.05, 0.5)
        # A session that outlives a disconnect: after a broker restart (with persistence) the
        # broker queues for this client until it is back.
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect(self.host, self.port, keepalive=10, properties=props)
        self.client.loop_start()
        # subscribed, not just connected: a message published next must reach this capture
        self.wait(lambda: self.subscribed >= len(self.topics), 5)

    def _on_connect(self, client, userdata, flags, reason, props) -> None:  # type: ignore[no-untyped-def]
        for t in self.topics:
            client.subscribe(t, qos=1)

    def _on_subscribe(self, client, userdata, mid, reasons, props) -> None:  # type: ignore[no-untyped-def]
        with self._cond:
            self.subscribed += 1
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        with self._cond:
            self.messages.append(
                Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.properties, msg.qos)
            )
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        return wait_notified(self._cond, predicate, timeout)

    def back(self, subscribed_before: int, timeout: float = 10.0) -> bool:
        """Wait until this capture has reconnected and subscribed again after a broker restart."""
        return self.wait(lambda: self.subscribed >= subscribed_before + len(self.topics), timeout)

    def on(self, topic_suffix: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(topic_suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class EventListener(Capture):
    """The devices' events under ``prefix``, as a dashboard sees them on the broker."""

    def __init__(self, b: Broker, prefix: str) -> None:
        super().__init__(b.host, b.port, (f"{prefix}/+/events",))
        assert self.subscribed, "the broker did not acknowledge the events subscription"

    @property
    def events(self) -> list[dict]:
        """Every event so far, decoded, in arrival order."""
        with self._cond:
            return [json.loads(m.payload) for m in self.messages]

    def states(self, model: str | None = None) -> list[str]:
        """The update states seen so far, of one model or of all."""
        return [
            e["details"].get("state")
            for e in self.events
            if e["kind"] == "update" and model in (None, e.get("model"))
        ]


def publisher(b: Broker | Cutter) -> mqtt.Client:
    """An MQTT 5 client connected to ``b`` with its loop running (``disconnect`` and
    ``loop_stop`` it at the end)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(b.host, b.port)
    c.loop_start()
    return c
