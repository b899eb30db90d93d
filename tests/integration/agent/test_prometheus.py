"""``GET /metrics`` for Prometheus: requests (not batches) counted, a latency histogram per
model version, and a real Prometheus (the Debian package) scraping a real ``inferd run`` and
answering ``histogram_quantile``."""

from __future__ import annotations

import http.client
import json
import math
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.daemon import Daemon
from telemetry.request_histogram import BUCKETS_S
from tests.support import models, prometheus
from tests.support.daemon import DaemonProc

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "models" / "demo.onnx"
DASHBOARD = ROOT / "examples" / "grafana" / "inferd.json"
FEATURES, CLASSES, CLIENTS = 6, 4, 8
P99 = "histogram_quantile(0.99, sum by (le) (rate(inferd_inference_duration_seconds_bucket[30s])))"


def samples(text: str, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
    """The samples of ``name`` whose labels include ``match``."""
    parsed = prometheus.parse_exposition(text)
    return [
        (labels, value)
        for n, labels, value in parsed["samples"]
        if n == name and all(labels.get(k) == v for k, v in match.items())
    ]


def one(text: str, name: str, **match: str) -> float:
    found = samples(text, name, **match)
    assert len(found) == 1, (name, match, found)
    return found[0][1]


def check_histogram(text: str, **match: str) -> None:
    """Cumulative buckets, one per bound plus +Inf, and +Inf == _count."""
    name = "inferd_inference_duration_seconds"
    buckets = samples(text, f"{name}_bucket", **match)
    assert [b[0]["le"] for b in buckets][-1] == "+Inf"
    assert [float(b[0]["le"]) for b in buckets[:-1]] == list(BUCKETS_S)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert counts[-1] == one(text, f"{name}_count", **match)


@pytest.fixture
def batching_daemon(
    tmp_path: Path, in_process_daemon: Callable[[dict[str, Any]], Daemon]
) -> Daemon:
    path = models.classifier(tmp_path / "clf.onnx", FEATURES, CLASSES)
    return in_process_daemon(
        {
            "device_id": "prom",
            "state_dir": str(tmp_path / "state"),
            "models": [
                # a long window: the clients' requests meet in one batch on a busy machine
                {"name": "batched", "path": str(path), "max_batch": 8, "batch_window_us": 200_000}
            ],
            "api": {"listen": "127.0.0.1:0", "workers": CLIENTS},
            "mqtt": {"enabled": False},
        },
    )


def get_metrics(host: str, port: int) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/plain; version=0.0.4"
        return resp.read().decode()
    finally:
        conn.close()


def test_a_batch_counts_each_of_its_requests(batching_daemon: Daemon) -> None:
    host, port = batching_daemon.api.address[:2]  # type: ignore[misc]
    conns = [http.client.HTTPConnection(host, port, timeout=30) for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)

    def client(i: int) -> int:
        x = np.full((1, FEATURES), i, np.float32)
        body = {"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32"}]}
        body["inputs"][0]["data"] = x.ravel().tolist()
        start.wait()
        conns[i].request("POST", "/v2/models/batched/infer", json.dumps(body).encode())
        resp = conns[i].getresponse()
        resp.read()
        return resp.status

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            assert list(pool.map(client, range(CLIENTS))) == [200] * CLIENTS
    finally:
        for c in conns:
            c.close()
    text = get_metrics(host, port)
    model = {"model": "batched", "version": "1"}
    runs = one(text, "inferd_model_runs_total", **model)
    assert 1 <= runs < CLIENTS, "the requests were batched"
    assert one(text, "inferd_inference_requests_total", **model) == CLIENTS
    assert one(text, "inferd_inference_duration_seconds_count", **model) == CLIENTS
    assert one(text, "inferd_inference_errors_total", **model) == 0
    check_histogram(text, **model)
    parsed = prometheus.parse_exposition(text)
    assert parsed["types"]["inferd_inference_duration_seconds"] == "histogram"


@pytest.fixture
def agent(inferd_daemon: Any, model_factory: Any) -> DaemonProc:
    daemon: DaemonProc = inferd_daemon(
        {
            "models": [
                {"name": "demo", "path": str(DEMO)},
                {"name": "broken", "path": str(model_factory("failing"))},
            ]
        }
    )
    return daemon


def x_tensor(x: np.ndarray) -> dict[str, Any]:
    return {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}


def test_failed_requests_are_counted_apart_from_the_histogram(agent: DaemonProc) -> None:
    x = np.ones((1, 8), np.float32)
    for _ in range(3):
        assert agent.infer("demo", [x_tensor(x)])[0] == 200
    assert agent.infer("broken", [x_tensor(np.ones((1, 4), np.float32))])[0] == 500
    status, text = agent.request("GET", "/metrics")
    assert status == 200
    demo = {"model": "demo", "version": "1"}
    assert one(text, "inferd_inference_requests_total", **demo) == 3
    assert one(text, "inferd_inference_duration_seconds_count", **demo) == 3
    assert one(text, "inferd_inference_duration_seconds_sum", **demo) > 0
    check_histogram(text, **demo)
    broken = {"model": "broken", "version": "1"}
    assert one(text, "inferd_inference_requests_total", **broken) == 1
    assert one(text, "inferd_inference_errors_total", **broken) == 1
    assert one(text, "inferd_inference_duration_seconds_count", **broken) == 0


@pytest.mark.skipif(prometheus.available() is not None, reason=str(prometheus.available()))
def test_real_prometheus_answers_histogram_quantile(agent: DaemonProc, tmp_path: Path) -> None:
    server = prometheus.PrometheusServer(tmp_path / "prometheus", [f"{agent.host}:{agent.port}"])
    try:
        x = x_tensor(np.ones((1, 8), np.float32))
        deadline = time.monotonic() + 90
        p99: float | None = None
        while p99 is None:
            assert time.monotonic() < deadline, f"no p99 from Prometheus: {server.logs()}"
            for _ in range(20):  # keep the rate above zero between scrapes
                assert agent.infer("demo", [x])[0] == 200
            result = server.query(P99)
            if result and math.isfinite(float(result[0]["value"][1])):
                p99 = float(result[0]["value"][1])
            else:
                time.sleep(0.2)
        targets = server.api("/api/v1/targets")["activeTargets"]
        assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")]
        assert 0 < p99 <= BUCKETS_S[-1], p99
        p50 = float(server.query(P99.replace("0.99", "0.5"))[0]["value"][1])
        assert 0 < p50 <= p99
        rps = server.query('sum(rate(inferd_inference_requests_total{model="demo"}[30s]))')
        assert float(rps[0]["value"][1]) > 0
        # The Grafana dashboard's queries parse and answer (its variables as "All").
        dashboard = json.loads(DASHBOARD.read_text())
        exported = agent.request("GET", "/metrics")[1]
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = re.sub(r"=~\"\$\w+\"", '=~".*"', target["expr"])
                expr = expr.replace("$__rate_interval", "30s")
                answer = server.query(expr)  # asserts that it parsed
                if "inferd_cpu_temperature_celsius" not in expr or "temperature" in exported:
                    assert answer, f"{panel['title']}: no data for {expr}"
    finally:
        server.stop()
    assert server.proc.returncode is not None
