"""Home Assistant MQTT discovery from a real ``inferd run`` against a private mosquitto.

What Home Assistant would see: a subscriber on ``homeassistant/#`` gets the retained configs;
each config's ``value_template`` reads fields that exist in the real ``metrics`` and ``status``
payloads the agent publishes (checked by the template's own references, jinja2 not being in the
lock), availability follows the status and its clean-shutdown payload, and a restart with the
option turned off clears every config.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.publish as mqtt_publish

from telemetry.payloads import SystemMetrics
from tests.support.broker import Broker, Capture
from tests.support.daemon import start_daemon
from tests.support.mqtt_agent import agent_config, infer

DEVICE = "ha-agent.1"
NODE = "ha-agent_1"
SYSTEM = re.compile(r'^\{\{ value_json\.system\.get\("(\w+)"\) \}\}$')
MODEL = re.compile(
    r'^\{\{ \(value_json\.models\.get\("([\w.-]+)"\) or \{\}\)\.get\("(\w+)"\) \}\}$'
)
VERSION = re.compile(
    r'^\{% for m in value_json\.get\("models", \[\]\) if m\.name == "([\w.-]+)" %\}'
    r"\{\{ m\.version \}\}\{% endfor %\}$"
)


def ha_config(model: Path, b: Broker, state: Path, discovery: bool) -> dict[str, Any]:
    return agent_config(
        model,
        b,
        state,
        device=DEVICE,
        telemetry={"metrics_interval_s": 0.3},
        homeassistant_discovery=discovery,
    )


def served(cap: Capture) -> dict[str, Any] | None:
    """The first metrics payload with the model's latencies (an interval with requests)."""
    for m in cap.on("/metrics"):
        payload: dict[str, Any] = json.loads(m.payload)
        if (payload["models"].get("clf") or {}).get("p99_ms"):
            return payload
    return None


def configs(cap: Capture) -> dict[str, dict[str, Any]]:
    return {
        m.topic: json.loads(m.payload)
        for m in cap.messages
        if m.topic.endswith("/config") and m.payload
    }


def check_template(config: dict[str, Any], metrics: dict[str, Any], status: dict[str, Any]) -> None:
    """The fields the template reads exist in the payload of its state topic."""
    template = config["value_template"]
    if m := SYSTEM.match(template):
        assert config["state_topic"].endswith("/metrics")
        field = m.group(1)
        assert field in SystemMetrics.__struct_fields__, template
        if field == "cpu_percent":  # measurable everywhere; others are absent where unknown
            assert isinstance(metrics["system"][field], float)
    elif m := MODEL.match(template):
        assert config["state_topic"].endswith("/metrics")
        value = metrics["models"][m.group(1)][m.group(2)]
        assert isinstance(value, float) and value > 0, (template, value)
    elif m := VERSION.match(template):
        assert config["state_topic"].endswith("/status")
        slots = [s for s in status["models"] if s["name"] == m.group(1)]
        assert [s["version"] for s in slots] == ["1"], status["models"]
    else:
        raise AssertionError(f"a template this test cannot check: {template!r}")


def test_home_assistant_sees_the_device_and_loses_it_when_the_option_is_off(
    tmp_path: Path,
    broker: Broker,
    capture_factory: Callable[..., Capture],
    model_factory: Callable[..., Path],
) -> None:
    model = model_factory("classifier")
    agent_topics = capture_factory(broker, f"inferd/{DEVICE}/#")
    run1 = tmp_path / "run1"
    run1.mkdir()
    d = start_daemon(run1, ha_config(model, broker, tmp_path / "state", discovery=True))
    try:
        deadline = time.monotonic() + 15
        while not agent_topics.wait(lambda: served(agent_topics) is not None, 0.1):
            assert time.monotonic() < deadline, d.stderr()
            infer(d)  # requests in every interval until a payload shows latencies
        ha = capture_factory(broker, "homeassistant/#")  # after the fact: HA started later
        assert ha.wait(lambda: len(configs(ha)) == 6, 10), (configs(ha).keys(), d.stderr())
    finally:
        assert d.stop() == 0, d.stderr()
    assert all(m.retain for m in ha.messages), "the configs are retained"
    metrics = served(agent_topics)
    assert metrics is not None
    statuses = [json.loads(m.payload) for m in agent_topics.on("/status")]
    online = next(s for s in statuses if s["state"] == "online")
    assert statuses[-1]["state"] == "offline", "the clean shutdown's status"
    found = configs(ha)
    assert sorted(t.split("/")[3] for t in found) == sorted(
        ["cpu", "temperature"]
        + [f"clf_{s}" for s in ("latency_p50", "latency_p99", "requests")]
        + ["clf_version"]
    )
    for topic, config in found.items():
        assert topic.startswith(f"homeassistant/sensor/{NODE}/"), topic
        assert config["state_topic"] in {m.topic for m in agent_topics.messages}
        assert config["availability_topic"] == f"inferd/{DEVICE}/status"
        assert config["availability_template"] == "{{ value_json.state }}"
        assert {online["state"], statuses[-1]["state"]} == {
            config["payload_available"],
            config["payload_not_available"],
        }
        assert config["device"]["sw_version"] == online["agent_version"]
        check_template(config, metrics, online)

    # The option turned off: the next connect clears every config it had published.
    before = len(ha.messages)
    run2 = tmp_path / "run2"
    run2.mkdir()
    d2 = start_daemon(run2, ha_config(model, broker, tmp_path / "state", discovery=False))
    try:
        cleared = lambda: {m.topic for m in ha.messages[before:] if m.payload == b""}  # noqa: E731
        assert ha.wait(lambda: cleared() == set(found), 10), (cleared(), d2.stderr())
    finally:
        assert d2.stop() == 0, d2.stderr()
    sentinel = "homeassistant/sensor/zz-test/sentinel/config"
    mqtt_publish.single(sentinel, b"{}", qos=1, retain=True, hostname=broker.host, port=broker.port)
    fresh = capture_factory(broker, "homeassistant/#")
    assert fresh.wait(lambda: any(m.topic == sentinel for m in fresh.messages), 5)
    assert [m.topic for m in fresh.messages] == [sentinel], "no config is left retained"
    assert msgspec.json.decode(fresh.messages[0].payload) == {}
