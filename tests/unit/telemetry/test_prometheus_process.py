"""The process and device gauges on /metrics: CPU seconds, RSS, and the sysfs temperature."""

from __future__ import annotations

from pathlib import Path

from telemetry.prometheus import process_families, render


def test_temperature_is_read_from_sysfs_millidegrees_and_left_out_when_unknown(
    tmp_path: Path,
) -> None:
    temp = tmp_path / "temp"
    temp.write_text("51250\n")
    text = render(process_families(temp))
    assert "inferd_cpu_temperature_celsius 51.25" in text.splitlines()
    cpu = [ln for ln in text.splitlines() if ln.startswith("process_cpu_seconds_total ")]
    assert len(cpu) == 1 and float(cpu[0].split()[1]) > 0
    rss = [ln for ln in text.splitlines() if ln.startswith("process_resident_memory_bytes ")]
    assert len(rss) == 1 and int(rss[0].split()[1]) > 10 * 2**20
    temp.write_text("not a number")
    assert "inferd_cpu_temperature_celsius" not in render(process_families(temp))
    assert "inferd_cpu_temperature_celsius" not in render(process_families(None))
