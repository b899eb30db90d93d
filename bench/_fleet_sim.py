"""Lightweight simulated devices for ``bench.fleet --devices N``: thousands per process.

A full agent costs about a dozen threads, an onnxruntime session and a SQLite spool; 10,000 of
them do not fit on a 2-core machine. A simulated device keeps what the broker and the
repository see of a device and drops what only the device's own CPU pays for:

kept      its own MQTT connection (client id ``inferd-{device}``, keepalive, a retained
          ``offline`` last will), the agent's topics, QoS and retain flags, its subscriptions to
          ``cmd/#`` and ``groups/{group}/#``, the real payload structs and encoder (``Status``
          with the node it is on, ``Metrics`` built by the real ``MetricsCollector`` and
          ``MetricsPublisher.build`` from a trivial runtime's requests, ``PredictionBatch``,
          ``Event``), commands decoded as the link does, and on a group poke the requests a
          no-op TUF refresh makes (``{n+1}.root.json``, 404, then ``timestamp.json``), over HTTP
          to the repository;
          A device whose connection fails or is lost tries the next node after the link's
          jittered exponential backoff (``backoff_delay``, 1 s to 60 s).
dropped   the model (a "request" is a latency drawn at random), the spool (messages go out
          at once: the broker stays up in this benchmark), the signature checks of the TUF
          refresh (each device has its own CPU for those), and a thread per device: one
          selector loop per process drives every client through paho's external-loop API
          (``loop_read``/``loop_write``/``loop_misc``), one socket per device.

The parent drives a worker over stdin/stdout, one JSON object a line: ``{"go": true}`` starts
the connect storm; ``{"report": true}`` answers with counts and the poke arrival times since the
last report; ``{"stop": true}`` disconnects every device and exits.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import queue
import random
import resource
import selectors
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt.link import backoff_delay
from telemetry.metrics import MetricsCollector, MetricsPublisher
from telemetry.payloads import (
    Event,
    HostFacts,
    Offline,
    OutputSummary,
    PredictionBatch,
    PredictionRecord,
    SlotStatus,
    Status,
    SystemMetrics,
    UpdateState,
    utc_now,
)

log = logging.getLogger("bench.fleet.sim")

SLOT = "classifier"
KEEPALIVE_S = 60


class _Request:
    """What a slot listener reads of a served request (the trivial runtime's)."""

    __slots__ = ("error", "feeds", "latency_ns", "model", "outputs", "request_id", "ts", "version")

    def __init__(self, n: int) -> None:
        self.model = SLOT
        self.version = "1"
        self.request_id = f"r{n}"
        self.ts = time.time()
        self.latency_ns = int(random.uniform(0.3e6, 2.5e6))
        self.feeds: dict[str, Any] = {}
        self.outputs = None
        self.error = None


class _NoSpool:
    pending = 0
    size_bytes = 0
    dropped_records = 0


class SimDevice:
    """One device: a paho client driven by the worker's loop, and its telemetry."""

    def __init__(self, worker: Worker, device_id: str, groups: list[str], nodes: list[str]):
        self.w = worker
        self.id = device_id
        self.groups = groups
        self.nodes = nodes
        self.node_index = 0
        self.attempt = 0
        self.retry_at = 0.0
        self.root = f"{worker.prefix}/{device_id}"
        self.connected = False
        self.requests = 0
        self.collector = MetricsCollector()
        self.metrics = MetricsPublisher(
            device_id,
            worker.metrics_s,
            self.collector,
            worker.system_sample,
            _NoSpool(),
            lambda payload: self.publish("metrics", payload, qos=0),
        )
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"inferd-{device_id}",
            protocol=worker.protocol,
            clean_session=True if worker.protocol == mqtt.MQTTv311 else None,
        )
        self.client.will_set(
            f"{self.root}/status", msgspec.json.encode(Offline(device=device_id)), 1, True
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe

    @property
    def node(self) -> str:
        return self.nodes[self.node_index % len(self.nodes)]

    def connect(self) -> bool:
        host, _, port = self.node.rpartition(":")
        try:
            self.client.connect(host, int(port), KEEPALIVE_S)
        except OSError:
            self.w.backoff(self)
            return False
        sock = self.client.socket()
        assert sock is not None
        try:
            self.w.sel.register(sock, selectors.EVENT_READ, self)
        except KeyError:  # the number of a socket closed under the selector, reused
            self.w.sel.modify(sock, selectors.EVENT_READ, self)
        return True

    def publish(self, leaf: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if self.connected:
            self.client.publish(f"{self.root}/{leaf}", payload, qos=qos, retain=retain)
            self.w.sent += 1

    def status(self) -> bytes:
        return msgspec.json.encode(
            Status(
                device=self.id,
                groups=self.groups,
                agent_version="bench-sim",
                started_at=self.w.started_at,
                host=self.w.host_facts,
                models=[
                    SlotStatus(
                        name=SLOT, ready=True, version="1", runtime="sim", providers=["cpu"],
                        digest=None, signature_digest=None, update_state=UpdateState.IDLE,
                    )
                ],
                broker=self.node,
            )
        )  # fmt: skip

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.w.refused += 1
            return
        self.connected = True
        self.attempt = 0
        subs = [(f"{self.root}/cmd/#", 1)] + [
            (f"{self.w.prefix}/groups/{g}/#", 1) for g in self.groups
        ]
        client.subscribe(subs)
        self.publish("status", self.status(), retain=True)
        self.w.connected += 1
        # first metrics and predictions at a random point of the interval: no lockstep
        now = time.monotonic()
        self.w.schedule(now + random.uniform(0, self.w.metrics_s), self, "metrics")
        self.w.schedule(now + random.uniform(0, self.w.batch_s), self, "predictions")

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if any(getattr(c, "is_failure", False) for c in codes):
            self.w.sub_failed += 1
        else:
            self.w.subscribed += 1

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        if self.connected:
            self.w.connected -= 1
            self.w.lost += 1
        self.connected = False

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        rest = msg.topic[len(self.w.prefix) + 1 :].split("/")
        name = "/".join(rest[2:])
        try:
            args = msgspec.json.decode(msg.payload) if msg.payload.strip() else {}
        except msgspec.DecodeError:
            args = None
        if not isinstance(args, dict):
            self.emit("command-failed", f"{name}: the command body must be a JSON object")
            return
        if name in ("update", "check-update"):
            self.w.pokes.append((self.id, time.monotonic(), bool(msg.retain)))
            self.w.checks.put(self)

    def emit(self, kind: str, message: str, **details: Any) -> None:
        event = Event(device=self.id, kind=kind, message=message, details=details)
        self.publish("events", msgspec.json.encode(event))

    def tick(self, what: str) -> None:
        if not self.connected:
            return
        if what == "metrics":
            for _ in range(max(0, round(random.gauss(self.w.rps * self.w.metrics_s, 1)))):
                self.requests += 1
                self.collector.listener(_Request(self.requests))
            self.metrics.publish_once()
            self.w.schedule(time.monotonic() + self.w.metrics_s, self, "metrics")
        elif what == "predictions":
            n = max(1, round(self.w.rps * self.w.batch_s))
            now = utc_now()
            records = [
                PredictionRecord(
                    ts=now, model=SLOT, version="1", request_id=f"{self.id}-{self.requests + i}",
                    latency_ms=1.2, input_digest="0123456789abcdef",
                    outputs={"probs": OutputSummary(shape=[1, 3], min=0.1, max=0.7, mean=0.33)},
                )
                for i in range(n)
            ]  # fmt: skip
            batch = PredictionBatch(device=self.id, records=records)
            self.publish("predictions", msgspec.json.encode(batch))
            self.w.schedule(time.monotonic() + self.w.batch_s, self, "predictions")


class Worker:
    """This process's devices, their loop and the update-check pool."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.prefix = spec["prefix"]
        self.protocol = mqtt.MQTTv311 if spec["protocol"] == "3.1.1" else mqtt.MQTTv5
        self.metrics_s = float(spec["metrics_s"])
        self.batch_s = float(spec["batch_s"])
        self.rps = float(spec["rps"])
        self.repo_url = spec["repo_url"]
        self.started_at = utc_now()
        self.host_facts = HostFacts(hostname="sim", arch="x86_64", os="Linux", python="3")
        self._system = SystemMetrics(cpu_percent=5.0, load_1=0.2, memory_percent=30.0)
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, SimDevice, str]] = []
        self._seq = 0
        self.sent = self.connected = self.refused = self.lost = 0
        self.subscribed = self.sub_failed = 0
        self.pokes: list[tuple[str, float, bool]] = []
        self.checks: queue.Queue[SimDevice | None] = queue.Queue()
        self.checked = 0
        self.check_errors = 0
        self.devices = [SimDevice(self, d["id"], d["groups"], d["nodes"]) for d in spec["devices"]]
        self.stop = threading.Event()
        self.retry: list[SimDevice] = []
        """Devices whose connection failed or was lost: each second they try the next node."""

    def system_sample(self) -> SystemMetrics:
        return self._system

    def schedule(self, when: float, dev: SimDevice, what: str) -> None:
        self._seq += 1
        heapq.heappush(self.timers, (when, self._seq, dev, what))

    def storm(self) -> None:
        """Connect every device as fast as the broker accepts, reading CONNACKs in between."""
        for i, dev in enumerate(self.devices):
            if not dev.connect():
                self.retry.append(dev)
            if i % 50 == 49:
                self._read(0)

    def _read(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout=timeout):
            dev = key.data
            if dev.client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                self._drop(dev)
                self.retry.append(dev)

    def run(self) -> None:
        misc_at = time.monotonic() + 1.0
        while not self.stop.is_set():
            self._read(0.05)
            for dev in self.devices:
                if dev.connected and dev.client.want_write():
                    dev.client.loop_write()
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, dev, what = heapq.heappop(self.timers)
                dev.tick(what)
            if now >= misc_at:  # keepalive pings, and devices that lost their node reconnect
                misc_at = now + 1.0
                for dev in self.devices:
                    if dev.connected:
                        dev.client.loop_misc()
                again, self.retry = self.retry, []
                for dev in again:
                    if now < dev.retry_at or not dev.connect():
                        self.retry.append(dev)

    def _drop(self, dev: SimDevice) -> None:
        sock = dev.client.socket()
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
        for key in list(self.sel.get_map().values()):
            if key.data is dev:
                self.sel.unregister(key.fileobj)
        self.backoff(dev)

    def backoff(self, dev: SimDevice) -> None:
        """The next node, after the link's jittered exponential backoff (1 s to 60 s)."""
        dev.node_index += 1
        dev.retry_at = time.monotonic() + backoff_delay(dev.attempt, 1.0, 60.0)
        dev.attempt += 1

    def check_loop(self) -> None:
        """The update checks a poke asks for: a no-op TUF refresh's requests."""
        while True:
            dev = self.checks.get()
            if dev is None:
                return
            for path in ("metadata/2.root.json", "metadata/timestamp.json"):
                try:
                    with urllib.request.urlopen(self.repo_url + path, timeout=30) as resp:
                        resp.read()
                except urllib.error.HTTPError as err:
                    if err.code != 404:
                        self.check_errors += 1
                except OSError:
                    self.check_errors += 1
            self.checked += 1

    def report(self) -> dict[str, Any]:
        pokes, self.pokes = self.pokes, []
        return {
            "connected": self.connected,
            "refused": self.refused,
            "lost": self.lost,
            "sent": self.sent,
            "subscribed": self.subscribed,
            "sub_failed": self.sub_failed,
            "checked": self.checked,
            "check_errors": self.check_errors,
            "pokes": pokes,
        }

    def close(self) -> None:
        self.stop.set()
        for dev in self.devices:
            if dev.connected:
                dev.client.disconnect()


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (one socket per simulated device)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def main(spec: dict[str, Any]) -> int:
    logging.basicConfig(level=logging.WARNING, filename=spec.get("log"))
    raise_fd_limit()
    w = Worker(spec)
    checkers = [
        threading.Thread(target=w.check_loop, name=f"sim-check-{i}", daemon=True)
        for i in range(spec.get("check_threads", 4))
    ]
    for t in checkers:
        t.start()
    lock = threading.Lock()
    print(json.dumps({"ready": len(w.devices), "pid": os.getpid()}), flush=True)
    loop: threading.Thread | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("go"):
            started = time.monotonic()

            # the storm on the loop's thread: paho clients are driven from one thread only
            def go() -> None:
                w.storm()
                w.run()

            loop = threading.Thread(target=go, name="sim-loop")
            loop.start()
            print(json.dumps({"storm_started": started}), flush=True)
        elif cmd.get("report"):
            with lock:
                print(json.dumps(w.report()), flush=True)
        elif cmd.get("stop"):
            break
    w.stop.set()
    if loop is not None:
        loop.join()
    w.close()
    for _ in checkers:
        w.checks.put(None)
    print(json.dumps({"stopped": True}), flush=True)
    return 0
