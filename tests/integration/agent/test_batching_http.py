"""Dynamic batching through the real HTTP API: a daemon in this process (its API server, its
slots) serves one classifier twice, unbatched and with ``max_batch: 8``; concurrent keep-alive
clients send their own rows and ids. Expected outputs are computed with numpy from the model's
weights, independently of onnxruntime. The autouse leak check (tests/conftest.py) fails a test
that leaves a batching thread running.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.batching import Batcher
from agent.daemon import Daemon
from agent.slots import Prediction
from telemetry.metrics import MetricsCollector
from tests.support import models
from tests.support.waits import wait_until

FEATURES, CLASSES = 6, 4
CLIENTS = 8


def expected(x: np.ndarray) -> np.ndarray:
    w, b = models.classifier_weights(FEATURES, CLASSES)
    logits = x.astype(np.float64) @ w + b
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def daemon(tmp_path: Path, in_process_daemon: Callable[[dict[str, Any]], Daemon]) -> Daemon:
    path = models.classifier(tmp_path / "clf.onnx", FEATURES, CLASSES)
    return in_process_daemon(
        {
            "device_id": "batching",
            "state_dir": str(tmp_path / "state"),
            "models": [
                {"name": "plain", "path": str(path)},
                # a long window: the 8 clients' requests meet in one batch on a busy machine
                {"name": "batched", "path": str(path), "max_batch": 8, "batch_window_us": 200_000},
            ],
            "api": {"listen": "127.0.0.1:0", "workers": CLIENTS},
            "mqtt": {"enabled": False},
        },
    )


def post(conn: http.client.HTTPConnection, model: str, body: dict[str, Any]) -> tuple[int, Any]:
    conn.request(
        "POST",
        f"/v2/models/{model}/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def request(x: np.ndarray, rid: str) -> dict[str, Any]:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return {"id": rid, "inputs": [tensor]}


def probs(reply: dict[str, Any]) -> np.ndarray:
    out = reply["outputs"][0]
    assert out["name"] == "probs"
    return np.array(out["data"], np.float32).reshape(out["shape"])


def batcher(daemon: Daemon) -> Batcher:
    b = daemon.slots["batched"].current.batcher
    assert b is not None
    return b


def test_concurrent_clients_get_their_own_rows_ids_and_records(daemon: Daemon) -> None:
    host, port = daemon.api.address[:2]  # type: ignore[misc]
    slot = daemon.slots["batched"]
    heard: list[Prediction] = []
    metrics = MetricsCollector()
    slot.listeners += [heard.append, metrics.listener]
    rng = np.random.default_rng(7)
    rows = [1, 2, 1, 1, 1, 1, 1, 0]  # 8 rows: one full batch (and an empty request among them)
    xs = [rng.normal(size=(n, FEATURES)).astype(np.float32) for n in rows]
    conns = [http.client.HTTPConnection(host, port, timeout=30) for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)

    def client(i: int) -> tuple[tuple[int, Any], tuple[int, Any]]:
        body = request(xs[i], f"client-{i}")
        start.wait()
        batched = post(conns[i], "batched", body)
        return batched, post(conns[i], "plain", body)

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(client, range(CLIENTS)))
    finally:
        for c in conns:
            c.close()
    for i, ((status, reply), (plain_status, plain)) in enumerate(answers):
        assert (status, plain_status) == (200, 200), (reply, plain)
        assert reply["id"] == f"client-{i}" and reply["model_version"] == "1"
        got = probs(reply)
        assert got.shape == (rows[i], CLASSES)
        np.testing.assert_allclose(got, probs(plain), rtol=1e-6, atol=1e-7)  # row for row
        np.testing.assert_allclose(got, expected(xs[i]), rtol=1e-5, atol=1e-6)
    b = batcher(daemon)
    assert b.batches < CLIENTS, "the concurrent requests were run together"
    assert sorted(p.request_id for p in heard) == sorted(f"client-{i}" for i in range(CLIENTS))
    assert all(p.error is None and p.latency_ns > 0 for p in heard)
    for p in heard:
        i = int(p.request_id.split("-")[1])
        np.testing.assert_array_equal(p.feeds["x"], xs[i])
    assert metrics.take(1.0)["batched"].count == CLIENTS


def test_bad_request_gets_its_400_and_its_neighbours_their_answers(daemon: Daemon) -> None:
    host, port = daemon.api.address[:2]  # type: ignore[misc]
    good = [np.full((1, FEATURES), i, np.float32) for i in range(3)]
    conns = [http.client.HTTPConnection(host, port, timeout=30) for _ in range(4)]
    b = batcher(daemon)
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(post, conns[i], "batched", request(x, f"g{i}"))
                for i, x in enumerate(good)
            ]
            assert wait_until(lambda: b.waiting == 3)
            bad = np.ones((1, FEATURES + 1), np.float32)
            status, reply = post(conns[3], "batched", request(bad, "bad"))
            assert status == 400
            want = f"input 'x' has shape [1, {FEATURES + 1}], the model expects [-1, {FEATURES}]"
            assert reply == {"error": want}
            results = [f.result(timeout=30) for f in futures]
    finally:
        for c in conns:
            c.close()
    for x, (status, reply) in zip(good, results, strict=True):
        assert status == 200
        np.testing.assert_allclose(probs(reply), expected(x), rtol=1e-5, atol=1e-6)
    assert b.batches == 1


def test_stopping_the_daemon_answers_every_queued_request(tmp_path: Path, daemon: Daemon) -> None:
    """What SIGTERM runs (Daemon.stop): the API drains in-flight requests, the slots' batchers
    run what they hold, then every batching thread has ended."""
    host, port = daemon.api.address[:2]  # type: ignore[misc]
    xs = [np.full((1, FEATURES), i / 10, np.float32) for i in range(4)]
    conns = [http.client.HTTPConnection(host, port, timeout=30) for _ in xs]
    b = batcher(daemon)
    try:
        with ThreadPoolExecutor(len(xs)) as pool:
            futures = [
                pool.submit(post, conns[i], "batched", request(x, f"q{i}"))
                for i, x in enumerate(xs)
            ]
            assert wait_until(lambda: b.waiting == len(xs))  # all four queued, their window running
            daemon.stop()
            results = [f.result(timeout=30) for f in futures]
    finally:
        for c in conns:
            c.close()
    for i, (status, reply) in enumerate(results):
        assert status == 200 and reply["id"] == f"q{i}"
        np.testing.assert_allclose(probs(reply), expected(xs[i]), rtol=1e-5, atol=1e-6)
    assert not b.alive
    assert not [t for t in threading.enumerate() if t.name.startswith("inferd-batch-")]
