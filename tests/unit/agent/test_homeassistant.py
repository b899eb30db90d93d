"""Home Assistant MQTT discovery payloads against HA's discovery schema, and the record that
lets a later connect clear what is no longer published."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from agent import __version__
from agent.config import ConfigError, parse_config
from agent.mqtt.homeassistant import RECORD, discovery_configs, publish_discovery

# The keys an MQTT sensor's discovery config may have, written down from Home Assistant:
# core's homeassistant/components/mqtt/abbreviations.py (each full name with its abbreviation)
# and the MQTT sensor documentation (home-assistant.io, integrations/sensor.mqtt; "origin" from
# the MQTT integration page, "Adding information about the origin of a discovery message").
SENSOR_KEYS = {
    "availability": "avty",
    "availability_mode": "avty_mode",
    "availability_template": "avty_tpl",
    "availability_topic": "avty_t",
    "device": "dev",
    "device_class": "dev_cla",
    "enabled_by_default": "en",
    "encoding": "e",
    "entity_category": "ent_cat",
    "expire_after": "exp_aft",
    "force_update": "frc_upd",
    "icon": "ic",
    "json_attributes_template": "json_attr_tpl",
    "json_attributes_topic": "json_attr_t",
    "last_reset_value_template": "lrst_val_tpl",
    "name": "name",
    "object_id": "obj_id",
    "origin": "o",
    "payload_available": "pl_avail",
    "payload_not_available": "pl_not_avail",
    "qos": "qos",
    "state_class": "stat_cla",
    "state_topic": "stat_t",
    "unique_id": "uniq_id",
    "unit_of_measurement": "unit_of_meas",
    "value_template": "val_tpl",
}
DEVICE_KEYS = {
    "configuration_url": "cu",
    "connections": "cns",
    "hw_version": "hw",
    "identifiers": "ids",
    "manufacturer": "mf",
    "model": "mdl",
    "name": "name",
    "suggested_area": "sa",
    "sw_version": "sw",
    "via_device": "via_device",
}
ORIGIN_KEYS = {"name": "name", "sw_version": "sw", "support_url": "url"}
SENSOR_DEVICE_CLASSES = {"temperature", "duration", "timestamp", "data_size", "frequency"}
DURATION_UNITS = {"d", "h", "min", "s", "ms", "µs"}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
ENTITY_CATEGORIES = {"config", "diagnostic"}
HA_ID = re.compile(r"^[a-zA-Z0-9_-]+$")


def config(tmp_path: Path, **mqtt: Any) -> Any:
    return parse_config(
        {
            "device_id": "pi-4.kitchen",
            "state_dir": str(tmp_path),
            "models": [
                {"name": "clf", "path": "m.onnx"},
                {"name": "vad.v2", "path": "v.onnx"},
            ],
            "mqtt": {"enabled": True, **mqtt},
            "telemetry": {"metrics_interval_s": 10},
        },
        environ={},
    )


def test_payloads_use_only_keys_of_the_ha_mqtt_sensor_schema(tmp_path: Path) -> None:
    configs = discovery_configs(config(tmp_path, homeassistant_discovery=True))
    assert len(configs) == 2 + 4 * 2  # cpu, temperature; per model p50, p99, rps, version
    unique_ids = set()
    for topic, raw in configs.items():
        prefix, component, node, object_id, leaf = topic.split("/")
        assert (prefix, component, leaf) == ("homeassistant", "sensor", "config")
        assert HA_ID.match(node) and HA_ID.match(object_id), topic
        assert node == "pi-4_kitchen"
        p = json.loads(raw)
        assert set(p) <= SENSOR_KEYS.keys(), set(p) - SENSOR_KEYS.keys()
        assert not set(p) & (set(SENSOR_KEYS.values()) - SENSOR_KEYS.keys()), "no abbreviations"
        assert {"state_topic", "unique_id", "name", "device", "value_template"} <= set(p)
        assert set(p["device"]) <= DEVICE_KEYS.keys()
        assert set(p["origin"]) <= ORIGIN_KEYS.keys()
        assert p["device"]["identifiers"] == ["inferd_pi-4_kitchen"]
        assert p["device"]["name"] == "pi-4.kitchen" and p["device"]["sw_version"] == __version__
        assert p["device"]["model"]
        assert p["availability_topic"] == "inferd/pi-4.kitchen/status"
        assert p["availability_template"] == "{{ value_json.state }}"
        assert (p["payload_available"], p["payload_not_available"]) == ("online", "offline")
        assert p["state_topic"] in {"inferd/pi-4.kitchen/metrics", "inferd/pi-4.kitchen/status"}
        if "device_class" in p:
            assert p["device_class"] in SENSOR_DEVICE_CLASSES
        if p.get("device_class") == "duration":
            assert p["unit_of_measurement"] in DURATION_UNITS
        if p.get("device_class") == "temperature":
            assert p["unit_of_measurement"] == "°C"
        if "state_class" in p:
            assert p["state_class"] in STATE_CLASSES and "unit_of_measurement" in p
        if "entity_category" in p:
            assert p["entity_category"] in ENTITY_CATEGORIES
        if p["state_topic"].endswith("/metrics"):
            assert p["expire_after"] == 30  # three metrics intervals
        assert p["value_template"].count("{{") == p["value_template"].count("}}") == 1
        unique_ids.add(p["unique_id"])
    assert len(unique_ids) == len(configs)
    version = json.loads(configs["homeassistant/sensor/pi-4_kitchen/vad_v2_version/config"])
    assert 'm.name == "vad.v2"' in version["value_template"] and "state_class" not in version


def test_off_by_default_and_the_prefix_is_checked(tmp_path: Path) -> None:
    assert config(tmp_path).mqtt.homeassistant_discovery is False
    assert config(tmp_path, homeassistant_prefix="ha").mqtt.homeassistant_prefix == "ha"
    with pytest.raises(ConfigError, match="homeassistant_prefix"):
        config(tmp_path, homeassistant_prefix="ha/#")


def test_a_later_connect_clears_what_is_no_longer_published(tmp_path: Path) -> None:
    sent: list[tuple[str, bytes]] = []

    def put(topic: str, payload: bytes) -> None:
        sent.append((topic, payload))

    publish_discovery(config(tmp_path), put)
    assert sent == [] and not (tmp_path / RECORD).exists(), "off: nothing published"

    on = config(tmp_path, homeassistant_discovery=True)
    publish_discovery(on, put)
    first = dict(sent)
    assert first == discovery_configs(on)
    assert json.loads((tmp_path / RECORD).read_text()) == sorted(first)

    sent.clear()  # a slot removed from the config: its four sensors are cleared
    one_model = parse_config(
        {
            "device_id": "pi-4.kitchen",
            "state_dir": str(tmp_path),
            "models": [{"name": "clf", "path": "m.onnx"}],
            "mqtt": {"homeassistant_discovery": True},
            "telemetry": {"metrics_interval_s": 10},
        },
        environ={},
    )
    publish_discovery(one_model, put)
    cleared = sorted(t for t, p in sent if p == b"")
    assert cleared == sorted(t for t in first if "/vad_v2_" in t)
    assert len(sent) - len(cleared) == 2 + 4

    sent.clear()  # turned off: every recorded config is cleared, then the record goes
    publish_discovery(config(tmp_path), put)
    assert sorted(t for t, _ in sent) == sorted(discovery_configs(one_model))
    assert all(p == b"" for _, p in sent)
    assert not (tmp_path / RECORD).exists()


def test_an_unreadable_record_is_replaced(tmp_path: Path) -> None:
    (tmp_path / RECORD).write_text("{not json")
    sent: list[tuple[str, bytes]] = []
    on = config(tmp_path, homeassistant_discovery=True)
    publish_discovery(on, lambda t, p: sent.append((t, p)))
    assert dict(sent) == discovery_configs(on)
    assert json.loads((tmp_path / RECORD).read_text()) == sorted(discovery_configs(on))
