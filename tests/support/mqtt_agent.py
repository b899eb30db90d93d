"""A real ``inferd run`` with MQTT on, for the system tests of its telemetry: the config (one
classifier ``clf``, a private broker, fast reconnects and metrics), a request to it, and an MQTT
request/response inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.broker import Broker, Capture, Cutter
from tests.support.daemon import DaemonProc

DEVICE = "agent-t"

BATCHED_TELEMETRY: dict[str, Any] = {
    "metrics_interval_s": 0.3,
    "prediction_batch_size": 40,
    "prediction_batch_ms": 100,
}
"""Metrics every 0.3 s and prediction batches of 40 or 100 ms."""


def agent_config(
    model: Path,
    b: Broker | Cutter,
    state: Path,
    *,
    device: str = DEVICE,
    telemetry: dict[str, Any] | None = None,
    **mqtt: Any,
) -> dict[str, Any]:
    """The daemon config: ``model`` as ``clf``, the broker (or proxy) ``b``, state in ``state``,
    updates off, ``telemetry`` (default :data:`BATCHED_TELEMETRY`); ``mqtt`` adds to its section."""
    return {
        "device_id": device,
        "state_dir": str(state),
        "models": [{"name": "clf", "path": str(model)}],
        "mqtt": {
            "enabled": True,
            "host": b.host,
            "port": b.port,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            **mqtt,
        },
        "updates": {"enabled": False},
        "telemetry": dict(BATCHED_TELEMETRY if telemetry is None else telemetry),
    }


def infer(d: DaemonProc, rid: str | None = None) -> None:
    """One request to ``clf`` that must succeed (with ``rid`` as its id, answered with it)."""
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1] * 4}
    status, body = d.infer("clf", [x]) if rid is None else d.infer("clf", [x], id=rid)
    assert status == 200 and (rid is None or body["id"] == rid), body


def request(cap: Capture, topic: str, body: bytes, corr: bytes, reply: str = "replies/x") -> None:
    """Publish an MQTT 5 request on ``topic`` with a response topic and correlation data."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply
    props.CorrelationData = corr
    cap.client.publish(topic, body, qos=1, properties=props)
