"""Per-model request statistics and the periodic ``metrics`` payload.

:class:`MetricsCollector` is a slot listener: on the request path it only counts and records the
latency in a bounded histogram. :class:`MetricsPublisher` builds one
:class:`~telemetry.payloads.Metrics` every interval from the collector, a resource sample and
the spool's state, on its own thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import msgspec

from telemetry.histogram import Histogram
from telemetry.payloads import Metrics, ModelMetrics, SpoolMetrics, SystemMetrics
from telemetry.prediction import Prediction

log = logging.getLogger(__name__)


class SpoolState(Protocol):
    """The spool figures the metrics report (``telemetry.spool.Spool`` fits)."""

    @property
    def pending(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def dropped_records(self) -> int: ...


class _ModelStats:
    __slots__ = ("count", "errors", "hist", "interval_count", "interval_errors", "lock", "version")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hist = Histogram()
        self.count = self.errors = self.interval_count = self.interval_errors = 0
        self.version: str | None = None


class MetricsCollector:
    """Counts requests and errors per model and keeps the interval's latency histogram."""

    def __init__(self) -> None:
        self._models: dict[str, _ModelStats] = {}
        self._lock = threading.Lock()

    def listener(self, p: Prediction) -> None:
        """Slot listener: record one request (a few hundred ns)."""
        stats = self._models.get(p.model)
        if stats is None:
            with self._lock:
                stats = self._models.setdefault(p.model, _ModelStats())
        if p.error is None:
            stats.hist.record(p.latency_ns)
        with stats.lock:
            stats.count += 1
            stats.interval_count += 1
            stats.version = p.version
            if p.error is not None:
                stats.errors += 1
                stats.interval_errors += 1

    def take(self, elapsed_s: float) -> dict[str, ModelMetrics]:
        """Per-model figures for the interval that just ended; starts the next interval."""
        out: dict[str, ModelMetrics] = {}
        for name, stats in list(self._models.items()):
            hist = stats.hist.take()
            with stats.lock:
                count, errors = stats.count, stats.errors
                n, n_err = stats.interval_count, stats.interval_errors
                stats.interval_count = stats.interval_errors = 0
                version = stats.version
            p50, p90, p99 = hist.quantiles_ms(0.5, 0.9, 0.99)
            out[name] = ModelMetrics(
                version=version,
                count=count,
                errors=errors,
                interval_count=n,
                interval_errors=n_err,
                rps=n / elapsed_s if elapsed_s > 0 else 0.0,
                p50_ms=p50,
                p90_ms=p90,
                p99_ms=p99,
                max_ms=hist.max_ns / 1e6 if hist.count else None,
            )
        return out


class MetricsPublisher:
    """Publishes a :class:`Metrics` payload every ``interval_s`` (``inferd-metrics`` thread)."""

    def __init__(
        self,
        device: str,
        interval_s: float,
        collector: MetricsCollector,
        sample: Callable[[], SystemMetrics],
        spool: SpoolState,
        publish: Callable[[bytes], object],
        *,
        other_drops: Callable[[], int] = lambda: 0,
    ) -> None:
        self.device = device
        self.interval_s = interval_s
        self.collector = collector
        self.sample = sample
        self.spool = spool
        self.publish = publish
        self.other_drops = other_drops
        """Prediction records dropped before reaching the spool (the logger fell behind)."""
        self._last = time.monotonic()
        self._dropped_reported = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def set_interval(self, interval_s: float) -> None:
        """Publish every ``interval_s`` from now on (SIGHUP): the thread re-plans its wait, so
        the next payload is due ``interval_s`` after the previous one, not after the old wait."""
        self.interval_s = interval_s
        self._wake.set()

    def build(self) -> Metrics:
        """The payload for the interval since the previous call."""
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        dropped = self.spool.dropped_records + self.other_drops()
        new_drops, self._dropped_reported = dropped - self._dropped_reported, dropped
        return Metrics(
            device=self.device,
            interval_s=round(elapsed, 3),
            models=self.collector.take(elapsed),
            system=self.sample(),
            spool=SpoolMetrics(
                queued_messages=self.spool.pending,
                queued_bytes=self.spool.size_bytes,
                dropped_records=new_drops,
                dropped_records_total=dropped,
            ),
        )

    def publish_once(self) -> None:
        """Build and queue one metrics message."""
        self.publish(msgspec.json.encode(self.build()))

    def start(self) -> None:
        self._stop.clear()
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="inferd-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while True:
            self._wake.wait(max(0.0, self._last + self.interval_s - time.monotonic()))
            self._wake.clear()  # stop() sets _stop first, so a stop this clears is seen below
            if self._stop.is_set():
                return
            if time.monotonic() < self._last + self.interval_s:
                continue  # woken by set_interval before the new interval is up
            try:
                self.publish_once()
            except Exception:  # one bad sample must not end metrics for good
                log.exception("metrics: cannot publish")
                self._last = time.monotonic()
