"""A bounded, mergeable latency histogram with log-spaced buckets.

Buckets grow by a constant ratio (``1 + 2 * RELATIVE_ERROR``), as in DDSketch, so any quantile
is within :data:`RELATIVE_ERROR` of a recorded value whatever the scale, memory is fixed (one
counter per bucket between 1 us and ~1000 s) and two histograms merge by adding counters. The
maximum is kept exactly.
"""

from __future__ import annotations

import math
import threading

RELATIVE_ERROR = 0.01
_GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_LOG_GAMMA = math.log(_GAMMA)
_MIN_NS = 1_000
_MAX_NS = 1_000 * 1_000_000_000
_BUCKETS = math.ceil(math.log(_MAX_NS / _MIN_NS) / _LOG_GAMMA) + 1
_LOG_MIN = math.log(_MIN_NS)


def _bucket(value_ns: int) -> int:
    if value_ns <= _MIN_NS:
        return 0
    return min(int((math.log(value_ns) - _LOG_MIN) / _LOG_GAMMA) + 1, _BUCKETS - 1)


def _value(bucket: int) -> float:
    """The representative value (ns) of a bucket: within RELATIVE_ERROR of all it holds."""
    if bucket == 0:
        return float(_MIN_NS)
    lower = _MIN_NS * _GAMMA ** (bucket - 1)
    return lower * 2 * _GAMMA / (_GAMMA + 1)


class Histogram:
    """Latencies in nanoseconds; ``record`` is thread-safe and O(1)."""

    __slots__ = ("_counts", "_lock", "count", "max_ns")

    def __init__(self) -> None:
        self._counts = [0] * _BUCKETS
        self._lock = threading.Lock()
        self.count = 0
        self.max_ns = 0

    def record(self, value_ns: int) -> None:
        """Add one observation."""
        b = _bucket(value_ns)
        with self._lock:
            self._counts[b] += 1
            self.count += 1
            self.max_ns = max(self.max_ns, value_ns)

    def merge(self, other: Histogram) -> None:
        """Add every observation of ``other`` into this histogram."""
        with other._lock:
            counts, count, max_ns = list(other._counts), other.count, other.max_ns
        with self._lock:
            for i, c in enumerate(counts):
                if c:
                    self._counts[i] += c
            self.count += count
            self.max_ns = max(self.max_ns, max_ns)

    def take(self) -> Histogram:
        """Return the observations so far as a new histogram and start this one empty."""
        fresh = Histogram()
        with self._lock:
            fresh._counts, self._counts = self._counts, fresh._counts
            fresh.count, self.count = self.count, 0
            fresh.max_ns, self.max_ns = self.max_ns, 0
        return fresh

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) in ns, within RELATIVE_ERROR; None when empty."""
        with self._lock:
            if self.count == 0:
                return None
            rank = q * (self.count - 1)
            seen = 0
            for i, c in enumerate(self._counts):
                seen += c
                if seen > rank:
                    return min(_value(i), float(self.max_ns))
        return float(self.max_ns)  # pragma: no cover - counts always reach count

    def quantiles_ms(self, *qs: float) -> list[float | None]:
        """Several quantiles at once, in milliseconds."""
        out: list[float | None] = []
        for q in qs:
            v = self.quantile(q)
            out.append(None if v is None else v / 1e6)
        return out
