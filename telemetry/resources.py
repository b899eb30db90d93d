"""Resource sampling: CPU, load, memory, process RSS, temperature, disk, GPU.

Every probe is optional: a field the device cannot measure is left out of the payload, never
reported as zero. GPU figures come from NVML when ``pynvml`` (nvidia-ml-py) is importable and
a GPU answers, else from the Jetson's sysfs load file when it exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import psutil

from telemetry.payloads import SystemMetrics

log = logging.getLogger(__name__)

THERMAL_ROOT = Path("/sys/class/thermal")
JETSON_GPU_LOAD = (
    Path("/sys/devices/platform/gpu.0/load"),
    Path("/sys/devices/gpu.0/load"),
    Path("/sys/devices/platform/17000000.gpu/load"),
    Path("/sys/devices/platform/bus@0/17000000.gpu/load"),
)
_CPU_SENSORS = ("coretemp", "k10temp", "cpu_thermal", "cpu-thermal", "soc_thermal", "zenpower")


class _Nvml:
    """NVML handle for GPU 0, or nothing when the library or a GPU is missing."""

    def __init__(self) -> None:
        self.handle: Any = None
        try:
            import pynvml
        except ImportError:
            return
        self.nvml: Any = pynvml
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except pynvml.NVMLError as err:  # no driver library, no device
            log.debug("no NVML GPU: %s", err)

    def sample(self, out: dict[str, Any]) -> None:
        if self.handle is None:
            return
        try:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            out["gpu_util_percent"] = float(util.gpu)
            out["gpu_memory_used_bytes"] = int(mem.used)
            out["gpu_memory_total_bytes"] = int(mem.total)
            out["gpu_temperature_c"] = float(
                self.nvml.nvmlDeviceGetTemperature(self.handle, self.nvml.NVML_TEMPERATURE_GPU)
            )
        except self.nvml.NVMLError as err:
            log.debug("NVML sample failed: %s", err)


def _read_number(path: Path) -> float | None:
    try:
        return float(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def thermal_zone(root: Path = THERMAL_ROOT) -> Path | None:
    """The sysfs temperature file of the CPU zone (or the first zone), if the kernel has one
    (no ``root``: none)."""
    zones = sorted(root.glob("thermal_zone*"))
    for zone in zones:
        kind = (zone / "type").read_text(encoding="ascii", errors="replace").strip().lower()
        if "cpu" in kind or "soc" in kind or "x86_pkg" in kind:
            return zone / "temp"
    return zones[0] / "temp" if zones else None


def cpu_temperature(thermal: Path | None) -> float | None:
    """CPU temperature in C from ``thermal`` (a sysfs ``temp`` file in millidegrees, see
    :func:`thermal_zone`), else from psutil's sensors, else None."""
    if thermal is not None:
        milli = _read_number(thermal)
        if milli is not None:
            return milli / 1000.0
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:
        return None
    try:
        readings = sensors()
    except (OSError, RuntimeError):
        return None
    for name in _CPU_SENSORS:
        if readings.get(name):
            return float(readings[name][0].current)
    for entries in readings.values():
        if entries:
            return float(entries[0].current)
    return None


class ResourceSampler:
    """Takes a :class:`SystemMetrics` sample; CPU percentages cover the time since the last one."""

    def __init__(self, disk_path: str | Path, *, thermal_root: Path = THERMAL_ROOT) -> None:
        self.disk_path = Path(disk_path)
        self.process = psutil.Process(os.getpid())
        self._thermal = thermal_zone(thermal_root)
        self._jetson = next((p for p in JETSON_GPU_LOAD if p.exists()), None)
        self._nvml = _Nvml()
        # Prime the CPU counters: the first real sample then covers one interval.
        psutil.cpu_percent(None)
        self.process.cpu_percent(None)

    def sample(self) -> SystemMetrics:
        """One sample of everything this device can measure."""
        out: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(None),
            "process_cpu_percent": self.process.cpu_percent(None),
        }
        with contextlib.suppress(OSError):
            out["load_1"], out["load_5"], out["load_15"] = os.getloadavg()
        mem = psutil.virtual_memory()
        out["memory_total_bytes"] = int(mem.total)
        out["memory_available_bytes"] = int(mem.available)
        out["memory_percent"] = float(mem.percent)
        with contextlib.suppress(psutil.Error):
            out["process_rss_bytes"] = int(self.process.memory_info().rss)
        temp = cpu_temperature(self._thermal)
        if temp is not None:
            out["temperature_c"] = temp
        with contextlib.suppress(OSError):
            out["disk_free_bytes"] = int(psutil.disk_usage(str(self.disk_path)).free)
        self._nvml.sample(out)
        if "gpu_util_percent" not in out and self._jetson is not None:
            load = _read_number(self._jetson)
            if load is not None:
                out["gpu_util_percent"] = load / 10.0  # the Jetson reports per mille
        return SystemMetrics(**out)
