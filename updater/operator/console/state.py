"""What the console knows about the fleet, fed by MQTT messages, read as one JSON document.

Devices (online, versions, update state, CPU, temperature) come from the same model as
``inferctl watch`` (:class:`telemetry.fleet.watch.Fleet`); this module adds what a page over time
needs: an hour of per-model p50, p99 and requests/s in fixed buckets, the latest quality and
drift per device and model, the versions each group runs, each slot's last update outcome and
the latest events. Every collection is bounded: a broker full of strangers costs a fixed amount
of memory, not more.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from telemetry.fleet.watch import Fleet
from telemetry.payloads import Event, Metrics, QualityPayload

SHARE_GROUP = "inferd-console"
"""The MQTT 5 shared-subscription group: consoles on one broker split the streams in it."""


def topics(prefix: str, shared: bool) -> list[tuple[str, int]]:
    """The console's subscriptions: (filter, qos).

    ``status`` and the group pokes are retained, and a broker never sends retained messages to
    a shared subscription (MQTT 5, 4.8.2), so every console subscribes to them on its own; so
    too the events, because each console judges every failure of a rollout. The periodic
    streams (metrics, quality: the load) are shared when ``shared``: two consoles each get
    half of them.
    """
    share = f"$share/{SHARE_GROUP}/" if shared else ""
    return [
        (f"{prefix}/+/status", 1),
        (f"{prefix}/groups/+/update", 1),
        (f"{prefix}/+/events", 1),
        (f"{share}{prefix}/+/metrics", 0),
        (f"{share}{prefix}/+/quality", 1),
    ]


@dataclass(frozen=True)
class Limits:
    """Bounds on what the console keeps."""

    window_s: float = 3600.0
    """How far back the latency and throughput plots go."""
    bucket_s: float = 10.0
    """One plotted point per model per bucket."""
    max_devices: int = 10_000
    max_models: int = 64
    max_events: int = 200


Point = tuple[float, float | None, float | None, float]
"""(bucket start, p50 ms, p99 ms, requests/s)."""


class Series:
    """One model's latency and throughput over the window, one point per bucket.

    A point combines the devices that reported in its bucket: p50 is the median of their p50s,
    p99 the largest p99 (the fleet's worst tail), requests/s the sum of their rates (each
    device's latest in the bucket). Only the open bucket keeps a sample per device; a closed
    one is four numbers, so an hour of a large fleet is a few kilobytes per model.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.closed: deque[Point] = deque(maxlen=int(limits.window_s // limits.bucket_s))
        self.start: float | None = None
        self.samples: dict[str, tuple[float | None, float | None, float]] = {}
        """device -> (p50 ms, p99 ms, requests/s) in the open bucket."""

    def add(
        self, now: float, device: str, p50: float | None, p99: float | None, rps: float
    ) -> None:
        start = now - now % self.limits.bucket_s
        if self.start is not None and start < self.start:
            return  # the clock went back: drop the sample rather than reorder the plot
        if self.start is not None and start > self.start:
            self.closed.append(self._point())
            self.samples = {}
        self.start = start
        if device in self.samples or len(self.samples) < self.limits.max_devices:
            self.samples[device] = (p50, p99, rps)

    def _point(self) -> Point:
        assert self.start is not None
        p50s = [s[0] for s in self.samples.values() if s[0] is not None]
        p99s = [s[1] for s in self.samples.values() if s[1] is not None]
        return (
            self.start,
            round(statistics.median(p50s), 3) if p50s else None,
            round(max(p99s), 3) if p99s else None,
            round(sum(s[2] for s in self.samples.values()), 3),
        )

    def to_json(self, now: float) -> dict[str, list[float | None]]:
        """Columns for the plot (uPlot's layout): t (unix s), p50, p99 (ms), rps."""
        oldest = now - self.limits.window_s
        points = [*self.closed, self._point()] if self.start is not None else []
        out: dict[str, list[float | None]] = {"t": [], "p50": [], "p99": [], "rps": []}
        for t, p50, p99, rps in points:
            if t < oldest:
                continue
            out["t"].append(t)
            out["p50"].append(p50)
            out["p99"].append(p99)
            out["rps"].append(rps)
        return out


def _quality_row(q: QualityPayload) -> dict[str, Any]:
    row: dict[str, Any] = {
        "device": q.device,
        "model": q.model,
        "version": q.version,
        "task": q.task,
        "samples": q.samples,
        "window_count": q.window_count,
        "ts": q.ts.isoformat(),
    }
    if q.classification is not None:
        c = q.classification
        row |= {"accuracy": c.accuracy, "f1": c.f1_macro, "roc_auc": c.roc_auc}
    if q.regression is not None:
        row |= {"mae": q.regression.mae, "rmse": q.regression.rmse}
    if q.drift is not None:
        d = q.drift
        row |= {"psi_max": d.psi_max, "drift_threshold": d.threshold, "drifted": d.drifted}
    return row


class ConsoleState:
    """The fleet as the console shows it; :meth:`feed` from the MQTT thread, read from others."""

    def __init__(
        self,
        prefix: str,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.prefix = prefix
        self.limits = limits or Limits()
        self.clock = clock
        self.fleet = Fleet(prefix)
        self.series: OrderedDict[str, Series] = OrderedDict()
        self.quality: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=self.limits.max_events)
        self.last_online: dict[str, dict[str, Any]] = {}
        """Each device's latest online status (bounded by the fleet's device cap)."""
        self.received: Counter[str] = Counter()
        """Messages taken, per topic leaf (status, metrics, quality, events)."""
        self.ignored = 0
        """Messages that did not parse or were over a bound (counted, not kept)."""
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self.generation = 0
        """Increases with every change: the event stream sends when it moved."""

    # -- input ------------------------------------------------------------------------------

    def feed(self, topic: str, payload: bytes) -> None:
        """Take one message from the broker; what does not parse is counted and dropped."""
        if not topic.startswith(self.prefix + "/"):
            return
        parts = topic[len(self.prefix) + 1 :].split("/")
        if len(parts) != 2 or not payload:
            return
        device, leaf = parts
        try:
            if leaf in ("status", "metrics"):
                known = device in self.fleet.devices
                if not known and len(self.fleet.devices) >= self.limits.max_devices:
                    self._bump(ignored=True)
                    return
                self.fleet.feed(topic, payload)
                if leaf == "status":
                    self._keep_last_online(device)
                if leaf == "metrics":
                    self._metrics(device, msgspec.json.decode(payload, type=Metrics))
            elif leaf == "quality":
                self._quality(msgspec.json.decode(payload, type=QualityPayload))
            elif leaf == "events":
                self.add_event(msgspec.json.decode(payload, type=Event))
            else:
                return
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._bump(ignored=True)
            return
        with self._lock:
            self.received[leaf] += 1
        self._bump()

    def _bump(self, ignored: bool = False) -> None:
        with self.changed:
            self.ignored += ignored
            self.generation += 1
            self.changed.notify_all()

    def _keep_last_online(self, device: str) -> None:
        # The watch model replaces a status with the offline will, which names no model; the
        # page still shows what an offline device served last.
        with self.fleet.lock:
            entry = self.fleet.devices.get(device)
            status = None if entry is None else entry.status
        if status is not None and status.get("state") == "online":
            with self._lock:
                self.last_online[device] = status

    def _metrics(self, device: str, m: Metrics) -> None:
        now = self.clock()
        with self._lock:
            for name, mm in m.models.items():
                series = self.series.get(name)
                if series is None:
                    if len(self.series) >= self.limits.max_models:
                        self.ignored += 1
                        continue
                    series = self.series[name] = Series(self.limits)
                series.add(now, device, mm.p50_ms, mm.p99_ms, mm.rps)

    def _quality(self, q: QualityPayload) -> None:
        key = (q.device, q.model)
        with self._lock:
            if key not in self.quality and len(self.quality) >= self.limits.max_devices:
                self.ignored += 1
                return
            self.quality[key] = _quality_row(q)

    def add_event(self, e: Event) -> None:
        """Keep one event for the page (the console's own decisions come through here too)."""
        row = {
            "ts": e.ts.isoformat(),
            "device": e.device,
            "kind": e.kind,
            "level": e.level,
            "message": e.message[:500],
            "model": e.model,
            "version": e.version,
        }
        with self.changed:
            self.events.appendleft(row)
            self.generation += 1
            self.changed.notify_all()

    def wake(self) -> None:
        """Wake every :meth:`wait` (on shutdown)."""
        self._bump()

    # -- output -----------------------------------------------------------------------------

    def wait(self, generation: int, timeout: float) -> int:
        """Block until the state is newer than ``generation`` (or ``timeout``); the new one."""
        with self.changed:
            self.changed.wait_for(lambda: self.generation != generation, timeout)
            return self.generation

    def devices(self) -> list[dict[str, Any]]:
        """The watch rows, with each device's groups and each slot's last update outcome."""
        rows = self.fleet.rows()
        with self._lock:
            statuses = dict(self.last_online)
        for row in rows:
            status = statuses.get(row["device"], {})
            row["groups"] = status.get("groups", [])
            row["agent_version"] = status.get("agent_version")
            slots = {m.get("name"): m for m in status.get("models", [])}
            if not row["online"]:  # last known versions; no live figures
                row["models"] = {
                    n: {"version": m.get("version"), "update_state": m.get("update_state")}
                    | dict.fromkeys(("p50_ms", "p99_ms", "rps"))
                    for n, m in slots.items()
                }
            for name, m in row["models"].items():
                m["last_update"] = slots.get(name, {}).get("last_update")
        return rows

    @staticmethod
    def versions_per_group(devices: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
        """group -> model -> version -> devices running it (online or not); "-": no group."""
        out: dict[str, dict[str, Counter[str]]] = {}
        for d in devices:
            for group in d["groups"] or ["-"]:
                per_model = out.setdefault(group, {})
                for name, m in d["models"].items():
                    per_model.setdefault(name, Counter())[str(m["version"])] += 1
        return {
            g: {n: dict(sorted(c.items())) for n, c in sorted(models.items())}
            for g, models in sorted(out.items())
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows except the rollouts (the driver adds those)."""
        devices = self.devices()
        now = self.clock()
        with self._lock:
            series = {name: s.to_json(now) for name, s in sorted(self.series.items())}
            quality = [self.quality[k] for k in sorted(self.quality)]
            events = list(self.events)
            ignored, generation = self.ignored, self.generation
            received = dict(self.received)
        return {
            "ts": now,
            "generation": generation,
            "devices": devices,
            "groups": self.versions_per_group(devices),
            "series": series,
            "quality": quality,
            "events": events,
            "received_messages": received,
            "ignored_messages": ignored,
        }
