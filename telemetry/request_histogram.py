"""Per-request counts and a Prometheus latency histogram for each served model version.

The backend's own counters (``RunStats``) count runs, and a batched model runs once for a whole
batch; Prometheus wants requests. :class:`RequestHistograms` is a slot listener, so it hears
every request once, batched or not, with the latency that request saw (for a batched model its
queue wait plus its batch's run).

The request path pays a ``bisect`` into a fixed bucket list and two integer additions (about
0.3 us measured here): no lock. Each thread that serves requests writes only its own shard
(a ``threading.local``), so no increment is lost whatever the number of API and MQTT worker
threads; the exposition adds the shards up. Reading another thread's counters while it writes
is safe under the GIL, and since every counter only grows each scrape is monotonic, and within
one scrape the buckets are read once, so ``le="+Inf"`` always equals ``_count``.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterable

from telemetry.prediction import Prediction
from telemetry.prometheus import Family

BUCKETS_S: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of the latency buckets: 10 us (a small model runs in 5-10 us here) to
10 s (a large one on a slow board), 2-2.5x apart; ``histogram_quantile`` interpolates within one."""

_BOUNDS_NS = tuple(round(b * 1e9) for b in BUCKETS_S)
_LE = (*(f"{b:.6f}".rstrip("0").rstrip(".") for b in BUCKETS_S), "+Inf")
_N = len(BUCKETS_S) + 1
_SUM = _N  # index of the sum of latencies (ns) in a counter list
_ERRORS = _N + 1  # index of the failed-request count

Counters = list[int]
"""Per-bucket counts (the last one above every bound), then the latency sum (ns), then errors."""


class Totals:
    """One model version's figures, summed over every thread's shard."""

    __slots__ = ("buckets", "errors", "sum_ns")

    def __init__(self, counters: Counters) -> None:
        self.buckets = counters[:_N]
        self.sum_ns = counters[_SUM]
        self.errors = counters[_ERRORS]

    @classmethod
    def empty(cls) -> Totals:
        """A version that has served nothing yet (its series start at zero)."""
        return cls([0] * (_N + 2))

    @property
    def count(self) -> int:
        """Successful requests (the histogram's ``_count``)."""
        return sum(self.buckets)

    @property
    def requests(self) -> int:
        """Every request, failed ones included."""
        return self.count + self.errors

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count at or below le)`` for every bucket, ``+Inf`` last."""
        out: list[tuple[str, int]] = []
        seen = 0
        for le, c in zip(_LE, self.buckets, strict=True):
            seen += c
            out.append((le, seen))
        return out


class RequestHistograms:
    """Counts every request per (model, version) and buckets the latency of the successful."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()  # taken once per thread, when its shard is made
        self._shards: list[tuple[weakref.ref[threading.Thread], dict[tuple[str, str], Counters]]]
        self._shards = []
        self._retired: dict[tuple[str, str], Counters] = {}
        """The shards of threads that have ended, folded together (no one writes them)."""

    def listener(self, p: Prediction) -> None:
        """Slot listener: count one request (no lock; this thread's shard only)."""
        try:
            shard: dict[tuple[str, str], Counters] = self._local.shard
        except AttributeError:
            shard = self._new_shard()
        key = (p.model, p.version)
        counters = shard.get(key)
        if counters is None:
            counters = shard[key] = [0] * (_N + 2)
        if p.error is None:
            latency = p.latency_ns
            counters[bisect_left(_BOUNDS_NS, latency)] += 1
            counters[_SUM] += latency
        else:
            counters[_ERRORS] += 1

    def _new_shard(self) -> dict[tuple[str, str], Counters]:
        shard: dict[tuple[str, str], Counters] = {}
        self._local.shard = shard
        with self._lock:
            self._shards.append((weakref.ref(threading.current_thread()), shard))
        return shard

    def totals(self) -> dict[tuple[str, str], Totals]:
        """Every (model, version) seen so far, with its figures summed over the threads."""
        with self._lock:
            live = []
            for ref, shard in self._shards:
                thread = ref()
                if thread is None or not thread.is_alive():
                    _fold(self._retired, shard.items())  # its writer is gone: fold it for good
                else:
                    live.append((ref, shard))
            self._shards = live
            merged = {k: list(v) for k, v in self._retired.items()}
            for _, shard in live:
                _fold(merged, list(shard.items()))
        return {k: Totals(v) for k, v in merged.items()}


def _fold(
    into: dict[tuple[str, str], Counters], items: Iterable[tuple[tuple[str, str], Counters]]
) -> None:
    for key, counters in items:
        mine = into.get(key)
        if mine is None:
            into[key] = list(counters)
        else:
            for i, c in enumerate(list(counters)):
                mine[i] += c


def add_histogram(family: Family, totals: Totals, **pairs: str) -> None:
    """Add ``totals`` as the ``_bucket``/``_sum``/``_count`` samples of a histogram family."""
    for le, n in totals.cumulative():
        family.add_suffixed("_bucket", n, **pairs, le=le)
    family.add_suffixed("_sum", f"{totals.sum_ns / 1e9:.9f}", **pairs)
    family.add_suffixed("_count", totals.count, **pairs)
