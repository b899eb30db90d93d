"""Hostile MQTT inference requests and commands against the agent's telemetry component and a
real mosquitto: every one gets the answer HTTP would give (or none, when the broker keeps an
oversized message from the device), and the device keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import parse_config
from agent.reporting import Telemetry
from agent.slots import ModelSlot
from tests.support.broker import Broker, Capture
from tests.support.models import classifier

ROOT = "inferd/dev1"
GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1] * 4}]}


@pytest.fixture
def agent(
    tmp_path: Path, broker: Broker, capture_factory: Any
) -> Iterator[tuple[Telemetry, Capture]]:
    model = classifier(tmp_path / "clf.onnx", n_features=4, n_classes=3)
    cfg = parse_config(
        {
            "device_id": "dev1",
            "state_dir": str(tmp_path / "state"),
            "api": {"max_body_bytes": 64 * 1024},
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "reconnect_min_s": 0.05,
                "inbox_max_bytes": 256 * 1024,
            },
            "models": [{"name": "clf", "path": str(model)}],
        },
        environ={},
    )
    slot = ModelSlot(cfg.models[0])
    slot.swap(slot.load(model, "1"))
    telemetry = Telemetry(cfg, {"clf": slot})
    cap = capture_factory(broker, "replies/#", f"{ROOT}/events")
    telemetry.start()
    try:
        assert cap.wait(lambda: bool(cap.on("/events")), 10)  # agent-started: it is connected
        yield telemetry, cap
    finally:
        telemetry.stop()


def ask(cap: Capture, topic: str, body: bytes, corr: bytes) -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = "replies/t"
    props.CorrelationData = corr
    cap.client.publish(topic, body, qos=1, properties=props).wait_for_publish(5)


def answer(cap: Capture, corr: bytes, timeout: float = 10) -> tuple[str, dict[str, Any]]:
    def mine() -> list[Any]:
        return [m for m in cap.on("replies/t") if m.properties.CorrelationData == corr]

    assert cap.wait(lambda: bool(mine()), timeout), f"no reply to {corr!r}"
    reply = mine()[0]
    # command replies carry no status
    status = dict(getattr(reply.properties, "UserProperty", [])).get("status", "")
    return status, json.loads(reply.payload)


def request(**overrides: Any) -> bytes:
    tensor = {**GOOD["inputs"][0], **overrides.pop("tensor", {})}
    return json.dumps({"inputs": [tensor], **overrides}).encode()


def test_hostile_inference_requests_get_the_http_answers(
    agent: tuple[Telemetry, Capture],
) -> None:
    telemetry, cap = agent
    infer = f"{ROOT}/infer/clf"
    cases = [
        (b"big", b'{"inputs": [], "pad": "' + b"x" * 100_000 + b'"}', "413", "limit"),
        (b"deep", b"[" * 60_000 + b"]" * 60_000, "413", "limit"),
        (
            b"nested",
            b'{"inputs": [], "parameters": {"p": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}",
            "400",
            "deep",
        ),
        (b"dims", request(tensor={"shape": [1] * 100, "data": [0.1]}), "400", "dimensions"),
        (b"id", request(id="i" * 10_000), "400", "id"),
        (b"nan", request(tensor={"data": ["nan"] * 4}), "400", "NaN"),
        (b"empty", b'{"inputs": []}', "400", ""),
        (b"shape", request(tensor={"shape": [1, 5], "data": [0.1] * 5}), "400", "shape"),
    ]
    for corr, body, _, _ in cases:
        ask(cap, infer, body, corr)
    for corr, _, status, words in cases:
        got, body = answer(cap, corr)
        assert got == status, (corr, body)
        assert words in body["error"], (corr, body)
    ask(cap, infer, request(id="fine"), b"ok")
    assert answer(cap, b"ok")[0] == "200"
    assert telemetry.link.dropped_inbound == 0


def test_a_message_over_the_inbox_bound_never_reaches_the_device(
    agent: tuple[Telemetry, Capture],
) -> None:
    """MQTT 5: the device tells the broker its Maximum Packet Size (``inbox_max_bytes``), and
    the broker drops what is larger instead of sending it."""
    telemetry, cap = agent
    ask(cap, f"{ROOT}/infer/clf", b"[" * 1_000_000, b"huge")
    ask(cap, f"{ROOT}/infer/clf", request(id="after"), b"after")
    assert answer(cap, b"after")[0] == "200"
    assert not [m for m in cap.on("replies/t") if m.properties.CorrelationData == b"huge"]
    assert telemetry.link.dropped_inbound == 0  # dropped by the broker, not held and dropped


def test_set_sampling_accepts_only_known_models(agent: tuple[Telemetry, Capture]) -> None:
    telemetry, cap = agent
    ask(cap, f"{ROOT}/cmd/set-sampling", b'{"rate": 0.5, "model": "nosuch"}', b"s1")
    _, body = answer(cap, b"s1")
    assert body["ok"] is False and "nosuch" in body["error"]
    assert telemetry.predictions.rates == {}
    ask(cap, f"{ROOT}/cmd/set-sampling", b'{"rate": 0.5, "model": "clf"}', b"s2")
    _, body = answer(cap, b"s2")
    assert body["ok"] is True and telemetry.predictions.rates == {"clf": 0.5}


def test_replies_go_only_under_the_allowed_prefixes(agent: tuple[Telemetry, Capture]) -> None:
    telemetry, cap = agent
    link = telemetry.link
    for topic in (
        f"{ROOT}/cmd/rollback",
        f"{ROOT}/cmd/set-sampling",
        "inferd/groups/kitchen/update",
        "inferd/other/cmd/rollback",
        f"{ROOT}/infer/clf",
        "inferd/other/infer/clf",
        f"{ROOT}/status",
        f"{ROOT}/events",
        "replies/#",
        "replies/+/x",
        "$SYS/x",
        "",
        "somewhere/else",
    ):
        assert link.reply_refusal(topic) is not None, topic
    for topic in (f"{ROOT}/infer/clf/reply", f"{ROOT}/infer/clf/reply/app", "replies/app/1"):
        assert link.reply_refusal(topic) is None, topic
    # A command's reply is held to the same rule.
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = f"{ROOT}/cmd/set-sampling"
    cap.client.publish(f"{ROOT}/cmd/set-sampling", b'{"rate": 1}', qos=1, properties=props)
    assert cap.wait(lambda: link.refused_replies >= 1, 10)
    assert cap.wait(lambda: any(json.loads(m.payload)["kind"] == "reply-refused"
                                for m in cap.on("/events")), 10)  # fmt: skip
