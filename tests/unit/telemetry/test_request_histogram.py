"""The per-request Prometheus histogram: bucket edges, lossless counting from many threads
without a lock, shards of ended threads kept, and the exposition's histogram invariants."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from telemetry.prometheus import Family, render
from telemetry.request_histogram import BUCKETS_S, RequestHistograms, add_histogram


@dataclass(frozen=True)
class Req:
    """Fits telemetry.prediction.Prediction for what the listener reads."""

    model: str
    version: str
    latency_ns: int
    error: str | None = None
    request_id: str = "r"
    ts: float = 0.0
    feeds: dict[str, object] | None = None
    outputs: dict[str, object] | None = None


def test_a_latency_on_a_bound_lands_in_that_bucket_and_errors_are_not_bucketed() -> None:
    h = RequestHistograms()
    h.listener(Req("m", "1", 1_000_000))  # exactly le="0.001"
    h.listener(Req("m", "1", 1_000_001))  # just above: le="0.0025"
    h.listener(Req("m", "1", 60_000_000_000))  # above every bound: only +Inf
    h.listener(Req("m", "1", 5, error="boom"))
    t = h.totals()[("m", "1")]
    cum = dict(t.cumulative())
    assert cum["0.0005"] == 0 and cum["0.001"] == 1 and cum["0.0025"] == 2
    assert cum["10"] == 2 and cum["+Inf"] == 3 == t.count
    assert t.errors == 1 and t.requests == 4
    assert t.sum_ns == 1_000_000 + 1_000_001 + 60_000_000_000


def test_many_threads_lose_no_request_and_ended_threads_keep_their_counts() -> None:
    h = RequestHistograms()
    threads, per_thread = 8, 20_000
    start = threading.Barrier(threads)

    def serve(i: int) -> None:
        start.wait()
        for k in range(per_thread):
            h.listener(Req("m", "1", 1000 * (k % 5000), error="x" if k % 1000 == 0 else None))

    workers = [threading.Thread(target=serve, args=(i,), name=f"t{i}") for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    first = h.totals()[("m", "1")]  # every writer has ended: their shards are folded
    assert first.requests == threads * per_thread
    assert first.errors == threads * per_thread // 1000
    h.listener(Req("m", "1", 1000))  # this thread's own shard adds to the folded ones
    again = h.totals()[("m", "1")]
    assert again.requests == first.requests + 1
    assert h.totals()[("m", "1")].requests == again.requests, "a read changes nothing"


def test_exposition_is_a_cumulative_histogram_per_version() -> None:
    h = RequestHistograms()
    for ns in (40_000, 3_000_000, 3_000_000, 2_000_000_000):
        h.listener(Req("clf", "7", ns))
    h.listener(Req("clf", "8", 40_000))
    fam = Family("inferd_inference_duration_seconds", "histogram", "Latency.")
    for (model, version), t in sorted(h.totals().items()):
        add_histogram(fam, t, model=model, version=version)
    text = render([fam])
    lines = text.splitlines()
    assert lines[1] == "# TYPE inferd_inference_duration_seconds histogram"
    v7 = [ln for ln in lines if 'version="7"' in ln]
    buckets = [ln for ln in v7 if ln.startswith("inferd_inference_duration_seconds_bucket")]
    assert len(buckets) == len(BUCKETS_S) + 1
    counts = [int(ln.rsplit(" ", 1)[1]) for ln in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert buckets[0].startswith(
        'inferd_inference_duration_seconds_bucket{model="clf",version="7",le="0.00001"} 0'
    )
    assert 'inferd_inference_duration_seconds_bucket{model="clf",version="7",le="0.00005"} 1' in v7
    assert buckets[-1].endswith('le="+Inf"} 4')
    assert 'inferd_inference_duration_seconds_count{model="clf",version="7"} 4' in v7
    total = (40_000 + 6_000_000 + 2_000_000_000) / 1e9
    assert f'inferd_inference_duration_seconds_sum{{model="clf",version="7"}} {total:.9f}' in v7
    assert 'inferd_inference_duration_seconds_count{model="clf",version="8"} 1' in lines
