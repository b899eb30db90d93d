"""Telemetry building blocks: histogram, resource sampling, metrics, the prediction log."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import pytest

from telemetry.histogram import RELATIVE_ERROR, Histogram
from telemetry.metrics import MetricsCollector, MetricsPublisher
from telemetry.payloads import Metrics, PredictionBatch, SystemMetrics
from telemetry.predictions import PredictionLogger, input_digest, summarize
from telemetry.resources import ResourceSampler


@dataclass(frozen=True)
class P:
    """A served prediction as a slot reports it."""

    model: str = "m"
    version: str = "1"
    request_id: str = "r"
    ts: float = field(default_factory=time.time)
    latency_ns: int = 1_000_000
    feeds: dict[str, np.ndarray] = field(
        default_factory=lambda: {"x": np.zeros((1, 4), np.float32)}
    )
    outputs: dict[str, np.ndarray] | None = field(
        default_factory=lambda: {"probs": np.array([[0.1, 0.7, 0.2]], np.float32)}
    )
    error: str | None = None


def test_histogram_quantiles_within_relative_error_and_merge() -> None:
    rng = np.random.default_rng(1)
    values = rng.lognormal(mean=13, sigma=1.5, size=20_000).astype(np.int64) + 1
    a, b = Histogram(), Histogram()
    for v in values[:10_000]:
        a.record(int(v))
    for v in values[10_000:]:
        b.record(int(v))
    a.merge(b)
    assert a.count == 20_000 and a.max_ns == values.max()
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(values, q, method="lower"))
        got = a.quantile(q)
        assert got is not None and abs(got - exact) / exact <= 2 * RELATIVE_ERROR, (q, got, exact)
    taken = a.take()
    assert taken.count == 20_000 and a.count == 0 and a.quantile(0.5) is None


def test_resource_sample_reads_sysfs_temperature_and_omits_what_is_missing(
    tmp_path: Path,
) -> None:
    zone = tmp_path / "thermal_zone0"
    zone.mkdir()
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("48312\n")
    sample = ResourceSampler(tmp_path, thermal_root=tmp_path).sample()
    assert sample.temperature_c == pytest.approx(48.312)
    assert sample.process_rss_bytes and sample.process_rss_bytes > 10_000_000
    assert sample.disk_free_bytes and sample.disk_free_bytes > 0
    assert sample.memory_total_bytes and sample.load_1 is not None
    encoded = msgspec.json.decode(msgspec.json.encode(sample))
    assert "gpu_util_percent" not in encoded  # no GPU here: absent, not zero


def test_resource_sample_without_sensors_has_no_made_up_temperature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    monkeypatch.setattr(psutil, "sensors_temperatures", dict, raising=False)  # a board without
    sample = ResourceSampler(tmp_path, thermal_root=tmp_path / "none").sample()
    assert sample.temperature_c is None
    assert "temperature_c" not in msgspec.json.decode(msgspec.json.encode(sample))


def test_metrics_payload_counts_errors_latency_rate_and_drops() -> None:
    collector = MetricsCollector()
    for i in range(100):
        collector.listener(P(latency_ns=(i + 1) * 100_000))
    collector.listener(P(error="boom", latency_ns=5))

    class FakeSpool:
        pending, size_bytes, dropped_records = 3, 999, 40

    sent: list[bytes] = []
    pub = MetricsPublisher(
        "dev",
        1.0,
        collector,
        SystemMetrics,
        FakeSpool(),
        sent.append,
        other_drops=lambda: 2,
    )
    pub.publish_once()
    m = msgspec.json.decode(sent[0], type=Metrics).models["m"]
    assert (m.count, m.errors, m.interval_count, m.interval_errors) == (101, 1, 101, 1)
    assert m.p50_ms == pytest.approx(5.0, rel=0.03) and m.max_ms == pytest.approx(10.0)
    assert m.p99_ms == pytest.approx(9.9, rel=0.03) and m.rps > 0
    spool = msgspec.json.decode(sent[0], type=Metrics).spool
    assert (spool.queued_messages, spool.dropped_records, spool.dropped_records_total) == (
        3,
        42,
        42,
    )
    pub.publish_once()
    again = msgspec.json.decode(sent[1], type=Metrics)
    assert again.models["m"].interval_count == 0 and again.models["m"].count == 101
    assert again.models["m"].p50_ms is None and again.spool.dropped_records == 0


def test_summaries_topk_for_classifiers_and_stats_otherwise() -> None:
    top = summarize(np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32), ["a", "b", "c"])
    assert top.top_k is not None
    assert [[(c.index, c.label) for c in row] for row in top.top_k] == [
        [(1, "b"), (2, "c"), (0, "a")],
        [(0, "a"), (2, "c"), (1, "b")],
    ]
    # logits with labels are a classifier; logits without are just numbers
    assert summarize(np.array([[2.0, -1.0]], np.float32), ["x", "y"]).top_k is not None
    plain = summarize(np.array([[2.0, -1.0, 5.0]], np.float32))
    assert (plain.top_k, plain.min, plain.max, plain.mean) == (None, -1.0, 5.0, 2.0)
    big = summarize(np.arange(1000, dtype=np.float32).reshape(10, 100))
    assert (big.min, big.max, big.mean) == (0.0, 999.0, 499.5)


def test_input_digest_is_stable_and_sensitive() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert input_digest({"x": x}) == input_digest({"x": x.copy()})
    assert input_digest({"x": x}) != input_digest({"x": x.reshape(4, 2)})
    assert input_digest({"x": x}) != input_digest({"x": x.astype(np.float64)})
    assert input_digest({"x": x[:, ::2]}) == input_digest({"x": np.ascontiguousarray(x[:, ::2])})


def collecting_logger(**kwargs: object) -> tuple[PredictionLogger, list[PredictionBatch]]:
    batches: list[PredictionBatch] = []
    lock = threading.Lock()

    def publish(payload: bytes, n: int) -> None:
        batch = msgspec.json.decode(payload, type=PredictionBatch)
        assert len(batch.records) == n
        with lock:
            batches.append(batch)

    return PredictionLogger("dev", publish, **kwargs), batches  # type: ignore[arg-type]


def test_logger_batches_by_count_and_by_time() -> None:
    logger, batches = collecting_logger(batch_size=10, batch_ms=100)
    logger.start()
    try:
        for i in range(25):
            logger.listener(P(request_id=str(i)))
        deadline = time.monotonic() + 5
        while sum(len(b.records) for b in batches) < 25 and time.monotonic() < deadline:
            time.sleep(0.01)
        sizes = [len(b.records) for b in batches]
        assert sizes[:2] == [10, 10] and sum(sizes) == 25  # the last 5 go after batch_ms
        ids = [r.request_id for b in batches for r in b.records]
        assert ids == [str(i) for i in range(25)]
    finally:
        logger.stop()


def test_logger_sampling_and_set_sampling_command() -> None:
    logger, batches = collecting_logger(batch_size=1000, batch_ms=10_000, sample_rate=0.0)
    for _ in range(100):
        logger.listener(P())
    assert len(logger._queue) == 0
    result = logger.set_sampling_command({"rate": 1.0, "model": "m"})
    assert result == {"default_rate": 0.0, "rates": {"m": 1.0}}
    for _ in range(50):
        logger.listener(P())
        logger.listener(P(model="other"))
    assert len(logger._queue) == 50
    logger.set_sampling(0.5)
    for _ in range(2000):
        logger.listener(P())
    assert 800 < len(logger._queue) - 50 < 1200
    with pytest.raises(msgspec.ValidationError):
        logger.set_sampling_command({"rate": 2})
    with pytest.raises(msgspec.ValidationError):
        logger.set_sampling_command({"rate": 0.5, "bogus": 1})
    logger.stop()  # never started: stop flushes nothing and returns
    assert batches == []


def test_record_fields_and_full_tensors_only_when_enabled() -> None:
    logger, _ = collecting_logger(labels={"m": ["a", "b", "c"]}, log_tensors=["t"])
    p = P(request_id="abc", latency_ns=2_500_000)
    rec = logger.record(p)
    assert (rec.model, rec.version, rec.request_id, rec.latency_ms) == ("m", "1", "abc", 2.5)
    assert rec.input_digest == input_digest(p.feeds)
    assert rec.outputs["probs"].top_k is not None
    assert rec.outputs["probs"].top_k[0][0].label == "b"
    assert rec.inputs_tensors is None and rec.outputs_tensors is None
    full = logger.record(P(model="t"))
    assert full.inputs_tensors is not None and full.inputs_tensors["x"].data == [0.0] * 4
    assert full.outputs_tensors is not None
    assert full.outputs_tensors["probs"].shape == [1, 3]
    failed = logger.record(P(error="bad input", outputs=None))
    assert failed.error == "bad input" and failed.outputs == {}


def test_logger_counts_what_it_cannot_queue() -> None:
    logger, _ = collecting_logger(max_queue=10)
    for _ in range(25):
        logger.listener(P())
    assert logger.dropped == 15
