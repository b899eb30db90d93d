"""The label join is bounded in bytes (issue 13: 30 requests with a 1 MB id added 118 MB): large
ids, large outputs and early labels arriving over HTTP or MQTT cannot grow the daemon's memory
past ``quality.join_max_bytes``, and what is pushed out is counted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from telemetry.config import QualityConfig
from telemetry.payloads import FeedbackItem
from telemetry.prediction_log import PredictionLogger
from telemetry.quality.feedback import JoinWindow, Label
from telemetry.quality.monitor import QualityMonitor

LIMIT = 1024 * 1024


@dataclass
class Served:
    """A served request as slot listeners hear about it."""

    request_id: str
    outputs: dict[str, np.ndarray]
    model: str = "clf"
    version: str = "1"
    ts: float = 0.0
    latency_ns: int = 1000
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None


def test_held_outputs_and_long_ids_stay_within_the_byte_bound() -> None:
    monitor = QualityMonitor(
        QualityConfig(join_max_bytes=LIMIT, join_max_pending=10_000),
        "dev",
        lambda p: None,
        queue_bytes=128 * LIMIT,  # the join is under test here, not the queue in front of it
    )
    rng = np.random.default_rng(0)
    for i in range(200):  # 200 x (64 x 1000 float32 = 256 KB) = 50 MB offered
        probs = rng.random((64, 1000), dtype=np.float32)
        monitor.listener(Served(f"{i:05d}" + "x" * 20_000, {"probs": probs}))
    monitor.drain()
    state = monitor._models["clf"]
    assert state.join.size_bytes <= LIMIT
    held = sum(v[1].rows.nbytes for v in state.join._predictions.values())
    assert held <= LIMIT and state.join.pending_predictions >= 2  # the newest are held
    assert state.join.counts.evicted_predictions == 200 - state.join.pending_predictions
    # the newest one is still there to be labelled
    newest = f"{199:05d}" + "x" * 20_000
    result = monitor.feedback_items("clf", [FeedbackItem(newest, label=[0] * 64)])
    assert result["results"][0]["status"] == "matched"


def test_early_labels_with_long_ids_stay_within_the_byte_bound() -> None:
    window: JoinWindow[Any, Label] = JoinWindow(600, 10_000, max_bytes=LIMIT)
    for i in range(500):  # 500 ids of 100 KB: 50 MB offered
        status, _ = window.add_label(f"{i:04d}" + "y" * 100_000, Label("class", (1,)))
        assert status == "pending"
    assert window.size_bytes <= LIMIT
    assert window.pending_labels < 500 and window.counts.unknown == 500 - window.pending_labels
    # ids remembered after a match count too
    for i in range(500):
        key = f"m{i:04d}" + "z" * 100_000
        window.add_prediction(key, object())
        window.add_label(key, Label("class", (1,)))
    assert window.size_bytes <= LIMIT


def test_predictions_waiting_for_the_worker_are_bounded_in_bytes() -> None:
    """The queue in front of the worker held 10,000 requests' tensors whatever their size."""
    monitor = QualityMonitor(QualityConfig(), "dev", lambda p: None, queue_bytes=LIMIT)
    big = np.zeros((64, 1000), np.float32)  # 256 KB of outputs, as many bytes of feeds
    for i in range(50):
        monitor.listener(Served(f"r{i}", {"probs": big}, feeds={"x": big}))
    assert monitor._queued_bytes <= LIMIT
    assert monitor._queue.qsize() == LIMIT // (2 * big.nbytes)
    assert monitor._models["clf"].dropped == 50 - monitor._queue.qsize()
    monitor.drain()
    assert monitor._queued_bytes == 0  # room again once the worker took them
    monitor.listener(Served("again", {"probs": big}, feeds={"x": big}))
    assert monitor._queue.qsize() == 1


def test_the_prediction_log_queue_is_bounded_in_bytes() -> None:
    published: list[int] = []
    logger = PredictionLogger("dev", lambda payload, n: published.append(n), max_queue_bytes=LIMIT)
    big = np.zeros((64, 1000), np.float32)
    for i in range(50):
        logger.listener(Served(f"r{i}", {"probs": big}, feeds={"x": big}))
    kept = LIMIT // (2 * big.nbytes)
    assert logger.dropped == 50 - kept
    logger.start()  # publishes what it kept, then has room again
    logger.stop()
    assert sum(published) == kept
    logger.listener(Served("again", {"probs": big}, feeds={"x": big}))
    assert logger.dropped == 50 - kept
