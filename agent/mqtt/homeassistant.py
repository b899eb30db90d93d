"""Home Assistant MQTT discovery (``mqtt.homeassistant_discovery``): the device as an HA device.

On every connect the link calls :func:`publish_discovery`, which queues one retained config per
sensor on ``{prefix}/sensor/{node_id}/{object_id}/config``: CPU and temperature for the device,
and p50/p99 latency, requests/s and the served version for each model slot. No topic is added:
each config's ``value_template`` reads the ``metrics`` payload the agent already publishes, or the
retained ``status`` (model versions); availability follows ``status`` and its last will.

The topics it published are kept in ``{state_dir}/homeassistant-discovery.json``. A later
connect clears (an empty retained payload, which HA takes as "remove") every recorded topic
it no longer publishes: all of them when the option is turned off, a slot's when the slot is
removed from the config.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import Config
from runtime.durable import write_atomic

log = logging.getLogger(__name__)

RECORD = "homeassistant-discovery.json"
"""The discovery topics published last time, under ``state_dir``."""

_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")
"""HA's node_id and object_id are ``[a-zA-Z0-9_-]+``; device and slot names may hold dots."""

Put = Callable[[str, bytes], None]
"""Queue a retained message (the spool's ``put_latest``: the newest per topic, kept on disk)."""


@dataclass(frozen=True)
class Sensor:
    object_id: str
    name: str
    leaf: str
    """The agent's topic the value is read from: ``metrics`` or ``status``."""
    template: str
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = "measurement"
    icon: str | None = None
    diagnostic: bool = False


def _ident(value: str) -> str:
    return _ID_BAD.sub("_", value)


def sensors(models: list[str]) -> list[Sensor]:
    """The sensors of a device serving ``models`` (slot names)."""
    out = [
        Sensor(
            "cpu",
            "CPU",
            "metrics",
            '{{ value_json.system.get("cpu_percent") }}',
            unit="%",
            icon="mdi:cpu-64-bit",
        ),
        Sensor(
            "temperature",
            "Temperature",
            "metrics",
            '{{ value_json.system.get("temperature_c") }}',
            unit="°C",
            device_class="temperature",
        ),
    ]
    for model in models:
        # .get() and `or {}`: a slot that has served nothing yet is absent from the payload, and
        # an interval with no request has null latencies; both render "None", which HA shows as
        # unknown instead of logging a template error.
        def metric(field: str, model: str = model) -> str:
            return f'{{{{ (value_json.models.get("{model}") or {{}}).get("{field}") }}}}'

        ident = _ident(model)
        out += [
            Sensor(
                f"{ident}_latency_p50",
                f"{model} latency p50",
                "metrics",
                metric("p50_ms"),
                unit="ms",
                device_class="duration",
                icon="mdi:timer-outline",
            ),
            Sensor(
                f"{ident}_latency_p99",
                f"{model} latency p99",
                "metrics",
                metric("p99_ms"),
                unit="ms",
                device_class="duration",
                icon="mdi:timer-alert-outline",
            ),
            Sensor(
                f"{ident}_requests",
                f"{model} requests/s",
                "metrics",
                metric("rps"),
                unit="req/s",
                icon="mdi:speedometer",
            ),
            Sensor(
                f"{ident}_version",
                f"{model} model version",
                "status",
                '{% for m in value_json.get("models", []) if m.name == "'
                + model
                + '" %}{{ m.version }}{% endfor %}',
                state_class=None,
                icon="mdi:tag-outline",
                diagnostic=True,
            ),
        ]
    return out


def discovery_configs(config: Config) -> dict[str, bytes]:
    """Discovery topic -> retained config payload, for every sensor of this device."""
    device = config.device_id
    root = f"{config.mqtt.topic_prefix}/{device}"
    node = _ident(device)
    block = {
        "identifiers": [f"inferd_{node}"],
        "name": device,
        "manufacturer": "inferd",
        "model": "inferd edge inference agent",
        "sw_version": __version__,
    }
    # Metrics come every metrics_interval_s; three missed in a row and the value is stale.
    expire = max(1, math.ceil(3 * config.telemetry.metrics_interval_s))
    out: dict[str, bytes] = {}
    for s in sensors([m.name for m in config.models]):
        payload: dict[str, Any] = {
            "name": s.name,
            "unique_id": f"inferd_{node}_{s.object_id}",
            "state_topic": f"{root}/{s.leaf}",
            "value_template": s.template,
            "availability_topic": f"{root}/status",
            "availability_template": "{{ value_json.state }}",
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": block,
            "origin": {"name": "inferd", "sw_version": __version__},
        }
        if s.unit is not None:
            payload["unit_of_measurement"] = s.unit
        if s.device_class is not None:
            payload["device_class"] = s.device_class
        if s.state_class is not None:
            payload["state_class"] = s.state_class
        if s.icon is not None:
            payload["icon"] = s.icon
        if s.diagnostic:
            payload["entity_category"] = "diagnostic"
        if s.leaf == "metrics":
            payload["expire_after"] = expire
        topic = f"{config.mqtt.homeassistant_prefix}/sensor/{node}/{s.object_id}/config"
        out[topic] = json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()
    return out


def publish_discovery(config: Config, put: Put) -> None:
    """Queue this device's discovery configs (when enabled) and clear the ones published before
    that are no longer wanted; never raises (discovery must not break a connect)."""
    record = Path(config.state_dir) / RECORD
    try:
        wanted = discovery_configs(config) if config.mqtt.homeassistant_discovery else {}
        previous = _read_record(record)
        for topic, payload in wanted.items():
            put(topic, payload)
        for topic in sorted(previous - wanted.keys()):
            put(topic, b"")  # HA removes the entity; the broker drops the retained config
        if wanted:
            if set(wanted) != previous:
                write_atomic(record, json.dumps(sorted(wanted)).encode())
        elif previous:
            record.unlink(missing_ok=True)
    except Exception:
        log.exception("mqtt: cannot publish the Home Assistant discovery configs")


def _read_record(path: Path) -> set[str]:
    try:
        topics = json.loads(path.read_bytes())
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as err:
        log.warning("mqtt: %s is unreadable (%s); starting a new one", path, err)
        return set()
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
        log.warning("mqtt: %s is not a list of topics; starting a new one", path)
        return set()
    return set(topics)
