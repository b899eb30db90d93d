"""Prometheus text exposition (format 0.0.4) for ``GET /metrics``: label escaping and families.

The API's request counters and the quality monitor's gauges are rendered by the same two
functions, so every label value is escaped the same way and each family appears once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

CONTENT_TYPE = "text/plain; version=0.0.4"


def label_value(value: str) -> str:
    """``value`` escaped for use between a label's double quotes (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(**pairs: str) -> str:
    """``{k="v",...}`` with every value escaped; ``""`` when there are none."""
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{label_value(v)}"' for k, v in pairs.items()) + "}"


@dataclass
class Family:
    """One metric family: its samples are ``(labels(...), value)`` pairs (a histogram's are
    ``(suffix + labels(...), value)``)."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    samples: list[tuple[str, object]] = field(default_factory=list)

    def add(self, value: object, **pairs: str) -> None:
        self.samples.append((labels(**pairs), value))

    def add_suffixed(self, suffix: str, value: object, **pairs: str) -> None:
        """A sample named ``name + suffix`` (a histogram's ``_bucket``, ``_sum``, ``_count``)."""
        self.samples.append((suffix + labels(**pairs), value))


def render(families: Iterable[Family]) -> str:
    """The exposition text of the families that have samples (``""`` when none has)."""
    lines: list[str] = []
    for f in families:
        if f.samples:
            lines += [f"# HELP {f.name} {f.help}", f"# TYPE {f.name} {f.kind}"]
            lines += [f"{f.name}{lab} {value}" for lab, value in f.samples]
    return "\n".join(lines) + "\n" if lines else ""


_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_families(temperature: float | None) -> list[Family]:
    """The process's CPU time and RSS (the standard ``process_*`` names) and the CPU
    ``temperature`` in C (absent when None)."""
    cpu = Family("process_cpu_seconds_total", "counter", "User and system CPU time of inferd.")
    t = os.times()
    cpu.add(f"{t.user + t.system:.2f}")
    rss = Family("process_resident_memory_bytes", "gauge", "Resident memory of inferd.")
    try:
        with open("/proc/self/statm", "rb") as f:
            rss.add(int(f.read().split()[1]) * _PAGE)
    except (OSError, ValueError, IndexError):
        pass  # not Linux: the family is left out
    temp = Family("inferd_cpu_temperature_celsius", "gauge", "CPU temperature of the device.")
    if temperature is not None:
        temp.add(temperature)
    return [cpu, rss, temp]
