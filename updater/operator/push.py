"""Reaching devices through the broker: group and device pokes, the fleet's retained status."""

from __future__ import annotations

import threading
import time
from typing import Any

import msgspec
import paho.mqtt.client as mqtt

from runtime.errors import MqttError
from telemetry.broker import BrokerOptions, connect


def poke_topic(prefix: str, group: str | None = None, device: str | None = None) -> str:
    """Where a push goes: a group's retained update poke, or one device's check-update."""
    if group is not None:
        return f"{prefix}/groups/{group}/update"
    return f"{prefix}/{device}/cmd/check-update"


def poke(client: mqtt.Client, topics: list[str], payload: bytes) -> None:
    """Leave a retained poke on each topic; MqttError unless the broker acknowledged all.

    A poke carries no authority: devices only ask the TUF repository for what is signed.
    """
    infos = [(t, client.publish(t, payload, qos=1, retain=True)) for t in topics]
    for topic, info in infos:
        info.wait_for_publish(10)
        if not info.is_published():
            raise MqttError(f"the broker did not acknowledge the poke on {topic}")


def collect_status(opts: BrokerOptions, prefix: str, wait_s: float) -> dict[str, dict[str, Any]]:
    """Retained ``status`` payloads per device, as decoded JSON."""
    found: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic[len(prefix) + 1 : -len("/status")]
        try:
            data = msgspec.json.decode(msg.payload)
        except msgspec.DecodeError:
            return
        if isinstance(data, dict):
            with lock:
                found[device] = data

    client = connect(opts)
    client.on_message = on_message
    try:
        client.subscribe(f"{prefix}/+/status", qos=1)
        time.sleep(wait_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return found
