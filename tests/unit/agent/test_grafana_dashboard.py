"""examples/grafana/inferd.json draws only what an agent exports: every metric name in every
PromQL expression is a sample name in the ``/metrics`` text of a running agent (in this
process: its real API server, a real model, one served request, a sysfs-like thermal file)."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import Daemon
from tests.support import models
from tests.support.prometheus import parse_exposition

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "examples" / "grafana" / "inferd.json"

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, label
    names in matchers or groupings, keywords, numbers or strings."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every panel target's and every template variable's query."""
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var["query"]["query"]
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        assert m is not None, query
        out.append(m.group(1))
    return out


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{model=~"$m", x="y"}'
        "[$__rate_interval]))) / on (instance) group_left b_total offset 5m > bool 0.5"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}


@pytest.fixture
def agent(tmp_path: Path, in_process_daemon: Callable[[dict[str, Any]], Daemon]) -> Daemon:
    path = models.classifier(tmp_path / "clf.onnx", 4, 3)
    return in_process_daemon(
        {
            "device_id": "grafana",
            "state_dir": str(tmp_path / "state"),
            "models": [{"name": "clf", "path": str(path), "max_batch": 4}],
            "api": {"listen": "127.0.0.1:0"},
            "mqtt": {"enabled": False},
        },
    )


def request(d: Daemon, method: str, path: str, body: bytes | None = None) -> bytes:
    host, port = d.api.address[:2]  # type: ignore[misc]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return data
    finally:
        conn.close()


def test_every_dashboard_query_reads_metrics_the_agent_exports(
    agent: Daemon, tmp_path: Path
) -> None:
    temp = tmp_path / "temp"
    temp.write_text("47000\n")
    agent.api.thermal = temp
    tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}
    request(agent, "POST", "/v2/models/clf/infer", json.dumps({"inputs": [tensor]}).encode())
    exported = {
        name
        for name, _, _ in parse_exposition(request(agent, "GET", "/metrics").decode())["samples"]
    }
    dashboard = json.loads(DASHBOARD.read_text())
    queries = exprs(dashboard)
    assert len(queries) >= 10
    used = set()
    for expr in queries:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} reads {sorted(names - exported)}, not exported"
        used |= names
    for wanted in (
        "inferd_inference_duration_seconds_bucket",
        "inferd_inference_requests_total",
        "inferd_inference_errors_total",
        "inferd_model_ready",
        "inferd_http_connections",
        "process_cpu_seconds_total",
        "inferd_cpu_temperature_celsius",
    ):
        assert wanted in used, f"the dashboard draws no {wanted}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
