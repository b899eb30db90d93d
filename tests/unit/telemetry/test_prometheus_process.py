"""The process and device gauges on /metrics: CPU seconds, RSS, and the CPU temperature, read
as the MQTT resource sample reads it (sysfs, else psutil's sensors)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from telemetry.prometheus import process_families, render
from telemetry.resources import cpu_temperature


def test_temperature_is_read_from_sysfs_millidegrees_and_left_out_when_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "temp"
    temp.write_text("51250\n")
    text = render(process_families(cpu_temperature(temp)))
    assert "inferd_cpu_temperature_celsius 51.25" in text.splitlines()
    cpu = [ln for ln in text.splitlines() if ln.startswith("process_cpu_seconds_total ")]
    assert len(cpu) == 1 and float(cpu[0].split()[1]) > 0
    rss = [ln for ln in text.splitlines() if ln.startswith("process_resident_memory_bytes ")]
    assert len(rss) == 1 and int(rss[0].split()[1]) > 10 * 2**20
    temp.write_text("not a number")
    monkeypatch.setattr(psutil, "sensors_temperatures", dict, raising=False)  # no sensors
    assert cpu_temperature(temp) is None
    assert "inferd_cpu_temperature_celsius" not in render(process_families(None))


def test_without_sysfs_the_temperature_comes_from_psutils_cpu_sensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A board whose kernel has no thermal zone but whose hwmon driver psutil reads: /metrics
    shows what the MQTT sample shows, not nothing."""
    readings = {  # psutil's entries: (label, current, high, critical) named tuples
        "nvme": [SimpleNamespace(label="Composite", current=38.0)],
        "k10temp": [SimpleNamespace(label="Tctl", current=61.5)],
    }
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: readings, raising=False)
    assert cpu_temperature(None) == 61.5  # the CPU's sensor, not the first one listed
    text = render(process_families(cpu_temperature(None)))
    assert "inferd_cpu_temperature_celsius 61.5" in text.splitlines()
