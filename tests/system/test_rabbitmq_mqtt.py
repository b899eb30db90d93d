"""The device's MQTT link against a private RabbitMQ 3.x node (its MQTT plugin: 3.1.1 only).

What differs from mosquitto, pinned here so that docs/scaling.md stays true: RabbitMQ closes an
MQTT 5 connection without a CONNACK (the link then tries 3.1.1), and it sends a retained message
only to a subscription on exactly its topic, never to one with a wildcard (so a dashboard on
``inferd/+/status`` sees no retained status, and a device's ``groups/{group}/#`` no retained poke).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.config import Config
from agent.mqtt.link import Command, MqttLink
from telemetry import broker as operator_broker
from telemetry.broker import BrokerOptions
from tests.support.broker import Cutter
from tests.support.links import link_config
from tests.support.nats import Watcher
from tests.support.rabbitmq import EPMD, RABBITMQ_SERVER, RabbitNode
from tests.support.waits import wait_until

pytestmark = pytest.mark.skipif(
    not Path(RABBITMQ_SERVER).exists() or EPMD is None, reason="rabbitmq-server is not installed"
)


@pytest.fixture
def rabbit(tmp_path: Path) -> Iterator[RabbitNode]:
    node = RabbitNode(tmp_path / "rabbitmq")
    node.start()
    yield node
    node.kill()


def states(w: Watcher, suffix: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in w.on(suffix)]


def test_the_link_on_rabbitmq(
    tmp_path: Path,
    rabbit: RabbitNode,
    make_link: Callable[[Config], MqttLink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "agent.mqtt.link")
    live = Watcher(rabbit.host, rabbit.port, "inferd/#")
    gate = Cutter(rabbit)  # type: ignore[arg-type]  # host/port is all it needs
    try:
        link = make_link(link_config(tmp_path, [f"{gate.host}:{gate.port}"]))
        got: list[Command] = []
        link.on_command("ping", lambda cmd: got.append(cmd) or {})  # type: ignore[func-returns-value]
        assert wait_until(lambda: link.connected, 20), caplog.text
        assert "closed an MQTT 5 connection unanswered; trying 3.1.1" in caplog.text
        assert "does not speak MQTT 5; using MQTT 3.1.1" in caplog.text

        # status, and events in order (QoS 1 through the spool)
        assert live.wait(lambda: any(s["state"] == "online" for s in states(live, "/dev1/status")))
        for i in range(200):
            link.emit_event("test", "x", n=i)
        assert live.wait(lambda: len(live.on("/events")) >= 200)
        assert [e["details"]["n"] for e in states(live, "/events")][:200] == list(range(200))

        # the operator tools fall back the same way
        ops = operator_broker.connect(BrokerOptions(host=rabbit.host, port=rabbit.port))
        assert ops.protocol == mqtt.MQTTv311
        ops.disconnect()
        ops.loop_stop()

        # a live group poke reaches the device
        live.publish("inferd/groups/kitchen/ping", b"{}")
        assert wait_until(lambda: len(got) == 1)

        # retained: only an exact-topic subscription gets it
        exact = Watcher(rabbit.host, rabbit.port, "inferd/dev1/status")
        wild = Watcher(rabbit.host, rabbit.port, "inferd/+/status")
        try:
            assert exact.wait(lambda: bool(exact.on("/status")))
            assert exact.on("/status")[0].retain
            # a live message after the subscription: any retained one would have come first
            live.publish("inferd/probe/status", b"{}")
            assert wild.wait(lambda: bool(wild.on("/status")))
            assert [m.topic for m in wild.on("/status")] == ["inferd/probe/status"]
        finally:
            exact.close()
            wild.close()

        # the last will, when the connection dies without a goodbye
        gate.cut()
        assert live.wait(lambda: states(live, "/dev1/status")[-1]["state"] == "offline")
        assert states(live, "/dev1/status")[-1]["reason"] == "connection-lost"
        gate.restore()
        assert live.wait(lambda: states(live, "/dev1/status")[-1]["state"] == "online", 15)
    finally:
        gate.close()
        live.close()
