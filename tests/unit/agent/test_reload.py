"""Config reload: live keys applied, restart-only keys reported by name, never silently ignored."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import Config, parse_config
from agent.reload import changed_keys, plan_reload, reload_config
from runtime.errors import ConfigError


def config(**overrides: Any) -> Config:
    data: dict[str, Any] = {
        "device_id": "dev-1",
        "models": [{"name": "a", "path": "/m/a.onnx"}, {"name": "b", "path": "/m/b.onnx"}],
    }
    for key, value in overrides.items():
        node = data
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return parse_config(data, environ={})


class Telemetry:
    """A component with live settings, as the telemetry link has."""

    def __init__(self) -> None:
        self.seen: list[Config] = []

    def reconfigure(self, config: Config) -> None:
        self.seen.append(config)


@pytest.fixture
def root_level() -> Iterator[None]:
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def test_changed_keys_name_the_field_paths() -> None:
    old = config()
    new = parse_config(
        {
            "device_id": "dev-1",
            "log_level": "debug",
            "api": {"listen": "127.0.0.1:9090"},
            "models": [
                {"name": "a", "path": "/m/a.onnx"},
                {"name": "b", "path": "/m/b.onnx", "threads": 2},
            ],
        },
        environ={},
    )
    assert changed_keys(old, new) == ["api.listen", "log_level", "models[1].threads"]
    assert changed_keys(old, old) == []
    one_model = parse_config(
        {"device_id": "dev-1", "models": [{"name": "a", "path": "/m/a.onnx"}]}, environ={}
    )
    assert "models" in changed_keys(old, one_model)


def test_plan_applies_live_keys_and_keeps_the_rest_running() -> None:
    old = config()
    new = config(
        log_level="warning",
        telemetry__prediction_sample_rate=0.1,
        telemetry__prediction_batch_size=10,
        mqtt__host="10.0.0.5",
    )
    plan = plan_reload(old, new)
    assert plan.applied == ("log_level", "telemetry.prediction_sample_rate")
    assert plan.needs_restart == ("mqtt.host", "telemetry.prediction_batch_size")
    effective = plan.config
    assert effective.log_level == "warning"
    assert effective.telemetry.prediction_sample_rate == 0.1
    # what needs a restart keeps its running value, so the daemon reports what is in effect
    assert effective.telemetry.prediction_batch_size == old.telemetry.prediction_batch_size
    assert effective.mqtt.host == old.mqtt.host


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_reload_reconfigures_components_and_warns_about_restart_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, root_level: None
) -> None:
    current = config()
    path = write(
        tmp_path / "config.yaml",
        {
            "device_id": "dev-1",
            "log_level": "debug",
            "telemetry": {"metrics_interval_s": 1.5},
            "mqtt": {"password": "s3cret-pw"},
            "models": [{"name": "a", "path": "/m/a.onnx"}, {"name": "b", "path": "/m/b.onnx"}],
        },
    )
    telemetry = Telemetry()
    with caplog.at_level(logging.INFO, logger="agent.reload"):
        result = reload_config(path, current, [telemetry, object()])
    assert result.applied == ("log_level", "telemetry.metrics_interval_s")
    assert result.needs_restart == ("mqtt.password",)
    assert logging.getLogger().level == logging.DEBUG
    assert telemetry.seen == [result.config]
    assert telemetry.seen[0].telemetry.metrics_interval_s == 1.5
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "mqtt.password" in warning.getMessage()
    assert "s3cret-pw" not in caplog.text  # the key is named, the secret never logged


def test_reload_with_nothing_live_does_not_touch_components(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        {"device_id": "dev-1", "models": [{"name": "a", "path": "/m/a.onnx", "threads": 4}]},
    )
    telemetry = Telemetry()
    result = reload_config(path, config(), [telemetry])
    assert result.applied == ()
    assert result.needs_restart == ("models",)
    assert telemetry.seen == []


def test_an_invalid_file_changes_nothing(tmp_path: Path, root_level: None) -> None:
    path = write(tmp_path / "c.yaml", {"device_id": "dev-1", "log_level": "loud"})
    telemetry = Telemetry()
    level = logging.getLogger().level
    with pytest.raises(ConfigError, match="log_level"):
        reload_config(path, config(), [telemetry])
    assert telemetry.seen == []
    assert logging.getLogger().level == level
