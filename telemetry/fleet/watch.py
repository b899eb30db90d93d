"""``inferctl watch``: a live table of the fleet, read from the broker.

It subscribes to ``{prefix}/+/status`` (retained, so every known device shows at once) and
``{prefix}/+/metrics``, and shows per device: online, model versions, p50/p99, requests/s, CPU,
temperature and update state. ``--json`` prints the fleet as one JSON document after
``--wait`` seconds, for scripts. ``--rollout SLOT`` shows one staged rollout instead
(:mod:`telemetry.fleet.rollout`): devices per update state, failures, rate and ETA. The table uses
rich when it is installed, plain text otherwise.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from telemetry.payloads import Metrics, StatusPayload

COLUMNS = ("device", "online", "models", "p50 ms", "p99 ms", "req/s", "cpu %", "temp C", "update")


@dataclass
class Device:
    status: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    seen: float = field(default_factory=time.time)


class Fleet:
    """What the broker has said about each device; fed by MQTT messages, read as rows."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.devices: dict[str, Device] = {}
        self.lock = threading.Lock()

    def feed(self, topic: str, payload: bytes) -> None:
        """Take a message from ``{prefix}/{device}/status|metrics``; skip what does not parse."""
        parts = topic.split("/")
        if len(parts) < 3 or not payload:
            return
        device, leaf = parts[-2], parts[-1]
        try:
            if leaf == "status":
                data = msgspec.to_builtins(msgspec.json.decode(payload, type=StatusPayload))
            elif leaf == "metrics":
                data = msgspec.to_builtins(msgspec.json.decode(payload, type=Metrics))
            else:
                return
        except msgspec.DecodeError:
            return  # another schema version or a foreign publisher: not ours to show
        with self.lock:
            entry = self.devices.setdefault(device, Device())
            entry.seen = time.time()
            if leaf == "status":
                entry.status = data
            else:
                entry.metrics = data

    def topics(self) -> list[tuple[str, int]]:
        """The subscriptions that feed the table: (filter, qos)."""
        return [(f"{self.prefix}/+/status", 1), (f"{self.prefix}/+/metrics", 0)]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per device, sorted by name (what ``--json`` prints)."""
        with self.lock:
            items = sorted(self.devices.items())
        out = []
        for name, dev in items:
            status = dev.status or {}
            metrics = dev.metrics or {}
            models = {m["name"]: m for m in status.get("models", [])}
            per_model = metrics.get("models", {})
            system = metrics.get("system", {})
            row: dict[str, Any] = {
                "device": name,
                "online": status.get("state") == "online",
                "models": {
                    n: {
                        "version": m.get("version"),
                        "update_state": m.get("update_state"),
                        "p50_ms": per_model.get(n, {}).get("p50_ms"),
                        "p99_ms": per_model.get(n, {}).get("p99_ms"),
                        "rps": per_model.get(n, {}).get("rps"),
                    }
                    for n, m in models.items()
                },
                "cpu_percent": system.get("cpu_percent"),
                "temperature_c": system.get("temperature_c"),
                "spool_messages": metrics.get("spool", {}).get("queued_messages"),
                "last_seen": dev.seen,
            }
            out.append(row)
        return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The table's cells: one line per device, models joined with commas."""
    out: list[tuple[str, ...]] = []
    for r in rows:
        models = r["models"].values()
        names = ", ".join(f"{n}@{_fmt(m['version'])}" for n, m in r["models"].items())
        out.append(
            (
                r["device"],
                "yes" if r["online"] else "no",
                names or "-",
                ", ".join(_fmt(m["p50_ms"], 2) for m in models) or "-",
                ", ".join(_fmt(m["p99_ms"], 2) for m in models) or "-",
                ", ".join(_fmt(m["rps"]) for m in models) or "-",
                _fmt(r["cpu_percent"]),
                _fmt(r["temperature_c"]),
                ", ".join(str(m["update_state"]) for m in models) or "-",
            )
        )
    return out


def render_text(rows: list[dict[str, Any]]) -> str:
    """A plain aligned text table."""
    cells = [COLUMNS, *table_rows(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(c))) for c in cells)
