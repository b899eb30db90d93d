"""The console process put together: one MQTT client feeding the state and the rollout
autopilot, a named thread ticking the autopilot, and the HTTP server."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
import paho.mqtt.client as mqtt

from telemetry.broker import BrokerOptions, connect
from telemetry.payloads import Event
from updater.operator.console.memory import memory_path
from updater.operator.console.rollouts import Autopilot, Policy
from updater.operator.console.server import ConsoleServer, ServerLimits
from updater.operator.console.state import ConsoleState, Limits, topics
from updater.operator.repository import OperatorRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsoleSettings:
    broker: BrokerOptions
    repo: str
    listen: str = "127.0.0.1:8090"
    token: bytes | None = None
    prefix: str = "inferd"
    console_id: str = "inferd-console"
    """The name the console's own events carry (``{prefix}/{console_id}/events``)."""
    policy: Policy = field(default_factory=Policy)
    tick_s: float = 1.0
    """How often the autopilot reads the repository and judges each rollout."""
    limits: Limits = field(default_factory=Limits)
    server: ServerLimits = field(default_factory=ServerLimits)


class ConsoleApp:
    """Start with :meth:`start`, end with :meth:`stop`; every thread it starts is joined."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.state = ConsoleState(settings.prefix, settings.limits)
        self.client: mqtt.Client | None = None
        self.autopilot = Autopilot(
            OperatorRepository(settings.repo),
            settings.policy,
            prefix=settings.prefix,
            console_id=settings.console_id,
            client=lambda: self.client,
            broker=lambda: settings.broker,
            on_event=self._own_event,
            memory=memory_path(settings.repo, settings.console_id),
        )
        self._own_topic = f"{settings.prefix}/{settings.console_id}/events"
        self._echoes: deque[bytes] = deque(maxlen=64)
        """The console's own events as published: shown at once, skipped when they come back."""
        self.server = ConsoleServer(self, settings.listen, settings.token, settings.server)
        self._stop = threading.Event()
        self._cache_lock = threading.Lock()
        self._cache: tuple[int, float, bytes] = (-1, 0.0, b"")
        self._ticker = threading.Thread(target=self._tick_loop, name="console-rollouts")

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        """Connect (MqttError when the broker cannot be reached), then serve and drive."""
        shared = self.settings.broker.protocol == "5"
        self.autopilot.tick()  # follow what is published before the retained status arrives
        self.client = connect(
            self.settings.broker,
            subscriptions=topics(self.settings.prefix, shared),
            on_message=self._on_message,
        )
        self.server.start()
        self._ticker.start()
        log.info("console on %s (broker %s)", self.url, self.settings.broker.where)

    def _own_event(self, event: Event) -> None:
        self._echoes.append(msgspec.json.encode(event))
        self.state.add_event(event)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if msg.topic == self._own_topic and payload in self._echoes:
            self._echoes.remove(payload)
            return
        try:
            self.state.feed(msg.topic, payload)
            self.autopilot.feed(msg.topic, payload)
        except Exception:  # an exception here would end paho's network thread
            log.exception("console: message on %s could not be taken", msg.topic)

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.settings.tick_s):
            try:
                if self.autopilot.tick():
                    self.state.wake()
            except Exception:  # keep serving; the next tick tries again
                log.exception("console: the rollout tick failed")

    def stop(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join(10)
        self.server.stop()
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    # -- what the server asks -----------------------------------------------------------------

    def snapshot_json(self) -> bytes:
        """The snapshot as JSON, made once for every open page and reused for up to 0.5 s
        while nothing changed (1000 devices with an hour of plots take ~0.1 s to make)."""
        with self._cache_lock:
            generation, made, data = self._cache
            if generation == self.state.generation and time.monotonic() - made < 0.5:
                return data
            data = msgspec.json.encode(self.snapshot())
            self._cache = (self.state.generation, time.monotonic(), data)
            return data

    def snapshot(self) -> dict[str, Any]:
        snap = self.state.snapshot()
        snap["rollouts"] = self.autopilot.snapshot()
        snap["console"] = {
            "id": self.settings.console_id,
            "broker": self.settings.broker.where,
            "connected": self.client is not None and self.client.is_connected(),
            "repo": str(self.settings.repo),
            "repo_error": self.autopilot.error,
            "policy": {
                "drive": self.settings.policy.drive,
                "soak_s": self.settings.policy.soak_s,
                "halt_ratio": self.settings.policy.halt_ratio,
                "min_attempted": self.settings.policy.min_attempted,
                "steps": list(self.settings.policy.steps),
            },
            "now": time.time(),
        }
        return snap

    def wait(self, generation: int, timeout: float) -> int:
        return self.state.wait(generation, timeout)

    def wake(self) -> None:
        self.state.wake()

    def halt(self, slot: str) -> str:
        d = self.autopilot.halt(slot)
        self.state.wake()
        return f"halted {slot}: {d.reason}"

    def resume(self, slot: str) -> str:
        d = self.autopilot.resume(slot)
        self.state.wake()
        return d.reason


def run(settings: ConsoleSettings, stop: threading.Event, ready: Any = None) -> None:
    """Run until ``stop`` is set; ``ready(url)`` once the page is served."""
    app = ConsoleApp(settings)
    try:
        app.start()
        if ready is not None:
            ready(app.url)
        stop.wait()
    finally:
        app.stop()
