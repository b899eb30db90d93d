"""Several brokers (``mqtt.hosts``): first that answers, failover with the spool intact, 3.1.1.

Two private mosquittos stand for the nodes of a cluster; a single private nats-server stands for
a broker that speaks MQTT 3.1.1 only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import Config
from agent.mqtt.link import Command, MqttLink
from telemetry import broker as operator_broker
from telemetry.broker import BrokerOptions
from tests.support.broker import Broker, Capture, publisher
from tests.support.links import link_config
from tests.support.nats import NatsCluster
from tests.support.net import free_port
from tests.support.waits import wait_until


def where(b: Broker) -> str:
    return f"{b.host}:{b.port}"


def statuses(c: Capture) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in c.on("/status")]


def event_numbers(c: Capture) -> list[int]:
    return [json.loads(m.payload)["details"]["n"] for m in c.on("/events")]


def online_on(c: Capture, node: str) -> bool:
    return any(s["state"] == "online" and s.get("broker") == node for s in statuses(c))


def test_the_first_node_that_answers_is_used(
    tmp_path: Path, broker: Broker, make_link: Callable[[Config], MqttLink], capture_factory: Any
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    cap = capture_factory(broker, "inferd/dev1/#")
    link = make_link(link_config(tmp_path, [dead, where(broker)]))
    assert cap.wait(lambda: online_on(cap, where(broker))), statuses(cap)
    assert link.node == where(broker)


def test_losing_a_node_moves_the_device_to_the_next_with_its_spool_in_order(
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    make_link: Callable[[Config], MqttLink],
    capture_factory: Any,
) -> None:
    b1, b2 = broker_factory(), broker_factory()
    cap1 = capture_factory(b1, "inferd/dev1/#")
    cap2 = capture_factory(b2, "inferd/dev1/#")
    link = make_link(link_config(tmp_path, [where(b1), where(b2)]))
    assert cap1.wait(lambda: online_on(cap1, where(b1))), statuses(cap1)
    link.emit_event("test", "before", n=-1)
    assert cap1.wait(lambda: event_numbers(cap1) == [-1])
    assert link.flush(5), "b1 acknowledged it (else it is sent again after the move: at-least-once)"

    b1.kill()
    # Written while the node is gone: they wait in the spool and go to the next node, in order.
    n = 300
    for i in range(n):
        link.emit_event("test", f"event {i}", n=i)
    assert cap2.wait(lambda: online_on(cap2, where(b2)), 15), statuses(cap2)
    assert cap2.wait(lambda: len(set(event_numbers(cap2))) >= n, 15), len(event_numbers(cap2))
    got = event_numbers(cap2)
    assert sorted(set(got)) == list(range(n)), "every spooled event arrived"
    assert got == sorted(got), "in the order they were written"
    assert link.flush(5) and link.spool.pending == 0
    assert link.node == where(b2)

    # and back, round-robin, when the second node goes too
    b1.start()
    cap1b = capture_factory(b1, "inferd/dev1/#")
    b2.kill()
    link.emit_event("test", "after", n=n)
    assert cap1b.wait(lambda: online_on(cap1b, where(b1)), 15), statuses(cap1b)
    assert cap1b.wait(lambda: n in event_numbers(cap1b), 10)


def test_commands_reach_the_device_on_its_new_node(
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    make_link: Callable[[Config], MqttLink],
    capture_factory: Any,
) -> None:
    b1, b2 = broker_factory(), broker_factory()
    link = make_link(link_config(tmp_path, [where(b1), where(b2)]))
    got: list[Command] = []
    link.on_command("ping", lambda cmd: got.append(cmd) or {"pong": True})  # type: ignore[func-returns-value]
    cap2 = capture_factory(b2, "inferd/dev1/#")
    assert wait_until(lambda: link.connected and link.node == where(b1))
    b1.kill()
    assert cap2.wait(lambda: online_on(cap2, where(b2)), 15)
    # the birth status goes after the subscriptions: online on b2 means it hears b2's commands
    pub = publisher(b2)
    try:
        pub.publish("inferd/groups/kitchen/ping", b"{}", qos=1).wait_for_publish(5)
        assert wait_until(lambda: len(got) == 1), (
            "the group poke reached the device on its new node"
        )
        assert got[0].group == "kitchen"
    finally:
        pub.disconnect()
        pub.loop_stop()


def test_operator_tools_take_the_first_node_that_answers_and_follow_a_loss(
    broker_factory: Callable[..., Broker],
) -> None:
    b1, b2 = broker_factory(), broker_factory()
    dead = ("127.0.0.1", free_port())
    seen: list[str] = []
    opts = BrokerOptions(
        host=dead[0], port=dead[1], hosts=(dead, (b1.host, b1.port), (b2.host, b2.port))
    )
    client = operator_broker.connect(
        opts,
        subscriptions=[("inferd/+/status", 1)],
        on_message=lambda _c, _u, msg: seen.append(msg.topic),
    )
    try:
        assert (client.host, client.port) == (b1.host, b1.port)
        b1.kill()
        # paho's loop reconnects on its own; the rotation aims it at the next live node
        assert wait_until(lambda: client.is_connected() and client.port == b2.port, 20)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2)
        pub.connect(b2.host, b2.port)
        pub.loop_start()
        pub.publish("inferd/x/status", b"{}", qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        assert wait_until(lambda: "inferd/x/status" in seen), "the subscription was restored on b2"
    finally:
        client.disconnect()
        client.loop_stop()


def test_no_node_answering_is_one_line_naming_them(broker_factory: Callable[..., Broker]) -> None:
    a, b = ("127.0.0.1", free_port()), ("127.0.0.1", free_port())
    with pytest.raises(operator_broker.MqttError, match="no broker node answered") as info:
        operator_broker.connect(BrokerOptions(host=a[0], port=a[1], hosts=(a, b)), timeout=2)
    assert str(a[1]) in str(info.value) and str(b[1]) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_broker_that_refuses_mqtt5_is_spoken_to_in_311(
    tmp_path: Path,
    nats_node: NatsCluster,
    make_link: Callable[[Config], MqttLink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = nats_node.nodes[0]
    seen: list[mqtt.MQTTMessage] = []
    # the operator side falls back the same way (NATS answers an MQTT 5 CONNECT with rc 1)
    watcher = operator_broker.connect(
        BrokerOptions(host=node.host, port=node.port, protocol="5"),
        subscriptions=[("inferd/dev1/#", 1)],
        on_message=lambda _c, _u, msg: seen.append(msg),
    )
    try:
        assert watcher.protocol == mqtt.MQTTv311
        link = make_link(link_config(tmp_path, [node.where]))
        got: list[Command] = []
        link.on_command("ping", lambda cmd: got.append(cmd) or {"pong": True})  # type: ignore[func-returns-value]
        assert wait_until(lambda: link.connected, 15), caplog.text
        assert "does not speak MQTT 5; using MQTT 3.1.1" in caplog.text
        link.emit_event("test", "over 3.1.1", n=1)

        def status_and_event() -> bool:
            topics = [m.topic for m in seen]
            return "inferd/dev1/status" in topics and "inferd/dev1/events" in topics

        assert wait_until(status_and_event, 10), [m.topic for m in seen]
        status = json.loads(next(m.payload for m in seen if m.topic.endswith("/status")))
        assert status["broker"] == node.where
        # a command without a response topic (3.1.1 has none) still runs
        watcher.publish("inferd/dev1/cmd/ping", b"{}", qos=1).wait_for_publish(5)
        assert wait_until(lambda: len(got) == 1)
    finally:
        watcher.disconnect()
        watcher.loop_stop()
