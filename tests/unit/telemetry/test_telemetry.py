"""Telemetry building blocks: histogram, resource sampling, metrics, the prediction log."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry.histogram import RELATIVE_ERROR, Histogram
from telemetry.metrics import MetricsCollector, MetricsPublisher
from telemetry.payloads import ClassScore, Metrics, OutputSummary, PredictionBatch, SystemMetrics
from telemetry.prediction_log import (
    STACK_MAX_VALUES,
    TOP_K,
    TOP_K_ROWS,
    PredictionLogger,
    input_digest,
    output_summaries,
    summarize,
)
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


def reference_summary(arr: np.ndarray, labels: list[str]) -> OutputSummary:
    """The documented summary rules, one output at a time in plain Python."""
    shape = list(arr.shape)
    if arr.dtype.kind not in "biuf" or arr.size == 0:
        return OutputSummary(shape=shape)
    if arr.dtype.kind == "f" and arr.ndim in (1, 2) and arr.shape[-1] >= 2:
        width = arr.shape[-1]
        rows = arr.reshape(-1, width)[:TOP_K_ROWS].astype(np.float64).tolist()
        probs = all(min(r) >= 0 and max(r) <= 1 and abs(sum(r) - 1) <= 1e-3 for r in rows)
        if probs or len(labels) == width:
            return OutputSummary(
                shape=shape,
                top_k=tuple(
                    tuple(
                        ClassScore(
                            index=i, score=r[i], label=labels[i] if i < len(labels) else None
                        )
                        for i in sorted(range(width), key=lambda i: -r[i])[:TOP_K]  # stable
                    )
                    for r in rows
                ),
            )
    values = arr.astype(np.float64).ravel()
    return OutputSummary(
        shape=shape, min=float(values.min()), max=float(values.max()), mean=float(values.mean())
    )


def _same(got: OutputSummary, want: OutputSummary) -> bool:
    return (got.shape, got.top_k, got.min, got.max) == (
        want.shape,
        want.top_k,
        want.min,
        want.max,
    ) and (want.mean is None or got.mean == pytest.approx(want.mean, rel=1e-9, abs=1e-12))


@st.composite
def outputs(draw: st.DrawFn) -> np.ndarray:
    """Classifier-like and other outputs; few distinct values so that scores tie often."""
    width = draw(st.sampled_from([1, 2, 3, 10, 65, 200]))
    rows = draw(st.sampled_from([None, 1, 2, 9]))
    shape = (width,) if rows is None else (rows, width)
    kind = draw(st.sampled_from(["probs", "logits", "int", "bool"]))
    weights = np.array(
        draw(
            st.lists(st.integers(0, 3), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
        )
    ).reshape(shape)
    if kind == "int":
        return weights.astype(np.int64) - 1
    if kind == "bool":
        return weights > 1
    weights = weights.astype(np.float64) + (weights.sum(axis=-1, keepdims=True) == 0)
    probs = weights / weights.sum(axis=-1, keepdims=True)
    return (probs if kind == "probs" else probs * 7 - 2).astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(arrays=st.lists(outputs(), min_size=1, max_size=12), labelled=st.booleans())
def test_batched_summaries_follow_the_rules_of_one_output(
    arrays: list[np.ndarray], labelled: bool
) -> None:
    """Stacked, vectorised summaries (any mix of shapes, ties, widths above and below the sort
    cut-over) equal the plain per-output rules: top-k with ties to the lower index, else stats."""
    labels = [f"c{i}" for i in range(arrays[0].shape[-1])] if labelled else []
    # repeated arrays make groups of the same shape, as a real batch has
    batch = [a for a in arrays for _ in range(2)]
    for got, arr in zip(output_summaries(batch, labels), batch, strict=True):
        assert _same(got, reference_summary(arr, labels)), (arr, got)


def test_top_k_of_a_wide_one_hot_output_takes_the_lowest_tied_indices() -> None:
    hot = np.zeros((2, 1000), np.float32)
    hot[0, 700] = hot[1, 3] = 1.0
    (summary,) = output_summaries([hot])
    assert summary.top_k is not None
    assert [[c.index for c in row] for row in summary.top_k] == [[700, 0, 1], [3, 0, 1]]


def test_outputs_too_big_to_stack_and_odd_dtypes_are_still_summarised() -> None:
    big = np.arange(STACK_MAX_VALUES * 2, dtype=np.float32).reshape(1, 2, -1)
    strings = np.array(["a", "b"], dtype=object)
    empty = np.zeros((0, 3), np.float32)
    got = output_summaries([big, big + 1, strings, empty, np.array(2.5)])
    assert (got[0].min, got[0].max, got[1].min) == (0.0, STACK_MAX_VALUES * 2 - 1, 1.0)
    assert got[2] == OutputSummary(shape=[2]) and got[3] == OutputSummary(shape=[0, 3])
    assert (got[4].shape, got[4].min, got[4].mean) == ([], 2.5, 2.5)


def test_records_of_a_mixed_batch_equal_records_built_one_by_one() -> None:
    logger, _ = collecting_logger(labels={"m": ["a", "b", "c"]}, log_tensors=["t"])
    rng = np.random.default_rng(3)
    batch = [
        P(request_id="same-1"),
        P(request_id="two-rows", outputs={"probs": rng.dirichlet([1, 1, 1], 2).astype("f4")}),
        P(request_id="failed", outputs=None, error="bad input"),
        P(
            model="t",
            request_id="two-inputs",
            feeds={"b": np.ones(3, np.int64), "a": np.arange(6, dtype=np.float32)[::2]},
            outputs={"y": np.arange(5000, dtype=np.float64), "z": np.array([True, False])},
        ),
        P(request_id="same-2", latency_ns=7),
        P(model="other", request_id="no-labels"),
    ]
    together = logger.records(batch)
    assert together == [logger.record(p) for p in batch]
    assert [r.request_id for r in together] == [p.request_id for p in batch]
    assert together[0].input_digest == together[4].input_digest != together[3].input_digest
    assert together[3].outputs["y"].max == 4999.0 and together[3].outputs_tensors is not None
    assert together[5].outputs["probs"].top_k[0][0].label is None  # type: ignore[index]


def test_input_digest_format_is_blake2b_of_name_dtype_shape_and_bytes() -> None:
    """Digests must stay comparable across agent versions: pin the exact byte layout."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = np.array([1, 2], np.int64)
    h = hashlib.blake2b(digest_size=8)
    for name, arr in (("x", x), ("y", y)):
        h.update(f"{name}\0{arr.dtype.str}\0{arr.shape}".encode() + arr.tobytes())
    assert input_digest({"y": y, "x": x}) == input_digest({"x": x, "y": y}) == h.hexdigest()


def test_stop_returns_promptly_while_the_thread_waits_for_a_batch_to_fill() -> None:
    logger, batches = collecting_logger(batch_size=1000, batch_ms=60_000)
    logger.start()
    thread = logger._thread
    assert thread is not None
    logger.listener(P(request_id="lonely"))
    time.sleep(0.2)  # the thread is now waiting for 999 more records or 60 s
    start = time.monotonic()
    logger.stop()
    assert time.monotonic() - start < 2
    assert not thread.is_alive()
    assert [r.request_id for b in batches for r in b.records] == ["lonely"]


def test_logger_survives_a_publish_failure_and_counts_the_records() -> None:
    calls: list[int] = []

    def publish(payload: bytes, n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            raise OSError("disk full")

    logger = PredictionLogger("dev", publish, batch_size=5, batch_ms=20)
    logger.start()
    try:
        for i in range(10):
            logger.listener(P(request_id=str(i)))
        deadline = time.monotonic() + 5
        while sum(calls) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        logger.stop()
    assert sum(calls) == 10 and logger.dropped == calls[0]


def test_a_new_metrics_interval_takes_effect_at_once() -> None:
    """SIGHUP from 300 s to 50 ms: the thread must not sleep out the old 300 s first."""
    sent: list[float] = []

    class NoSpool:
        pending = size_bytes = dropped_records = 0

    pub = MetricsPublisher(
        "dev",
        300.0,
        MetricsCollector(),
        SystemMetrics,
        NoSpool(),
        lambda _: sent.append(time.monotonic()),
    )
    pub.start()
    try:
        time.sleep(0.1)
        assert sent == []
        changed = time.monotonic()
        pub.set_interval(0.05)
        deadline = changed + 5
        while len(sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sent) >= 3 and sent[0] - changed < 1.0
        pub.set_interval(300.0)  # and back: no payload until 300 s after the last one
        time.sleep(0.1)
        count = len(sent)
        time.sleep(0.3)
        assert len(sent) == count
    finally:
        start = time.monotonic()
        pub.stop()
        assert time.monotonic() - start < 1


def test_prometheus_text_escapes_label_values_and_skips_empty_families() -> None:
    from telemetry.prometheus import Family, render

    runs = Family("x_total", "counter", "Runs.")
    runs.add(3, model='a"b\\c\nd', version="1")
    text = render([runs, Family("unused", "gauge", "Never set.")])
    assert text == (
        "# HELP x_total Runs.\n# TYPE x_total counter\n"
        'x_total{model="a\\"b\\\\c\\nd",version="1"} 3\n'
    )
    assert render([Family("unused", "gauge", "Never set.")]) == ""
