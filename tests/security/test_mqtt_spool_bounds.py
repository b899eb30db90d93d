"""Feedback floods and a full disk while the broker is away (issue 13): the spool stays within its
bound, every dropped feedback log is counted and evented, the labels still count, and a full
disk answers 503 without naming a path."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.app import build_daemon
from agent.config import parse_config
from agent.daemon import Daemon
from telemetry.spool import Kind, SpoolFullError
from tests.support.net import free_port

SPOOL = 1024 * 1024


@pytest.fixture
def daemon(
    tmp_path: Path, model_factory: Any, in_process_daemon: Callable[[dict[str, Any]], Daemon]
) -> Daemon:
    """An in-process daemon whose broker is down: everything it publishes waits in the spool."""
    model = model_factory("classifier", n_features=4, n_classes=3, seed=2)
    return in_process_daemon(
        {
            "device_id": "dev-1",
            "state_dir": str(tmp_path / "state"),
            "mqtt": {"host": "127.0.0.1", "port": free_port(), "reconnect_min_s": 5},
            "updates": {"enabled": False},
            "api": {"listen": "127.0.0.1:0", "max_body_bytes": 8 * 1024 * 1024},
            "telemetry": {"spool_max_bytes": SPOOL},
            "quality": {"publish_interval_s": 3600},
            "models": [{"name": "clf", "path": str(model)}],
        },
    )


def post(d: Daemon, path: str, body: object) -> tuple[int, dict[str, Any]]:
    host, port = d.api.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        data = json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def infer(d: Daemon, rid: str) -> None:
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1] * 4}
    status, body = post(d, "/v2/models/clf/infer", {"id": rid, "inputs": [x]})
    assert status == 200, body


def test_a_feedback_flood_stays_within_the_spool_and_is_counted(daemon: Daemon) -> None:
    assert daemon.telemetry is not None
    spool = daemon.telemetry.link.spool
    for i in range(20):  # 20 bodies of 300k values: 34.5 MB spooled before the fix
        status, body = post(
            daemon, "/v2/models/clf/feedback", {"id": f"r{i}", "value": [1.5] * 300_000}
        )
        assert status == 200, body
    assert spool.size_bytes <= SPOOL
    assert spool.kind_bytes(Kind.FEEDBACK) <= spool.feedback_max_bytes
    assert spool.dropped_feedback == 20
    events = [json.loads(m.payload) for m in spool.read(0, 1000) if m.topic.endswith("/events")]
    dropped = [e for e in events if e["kind"] == "feedback-dropped"]
    assert len(dropped) == 1 and dropped[0]["details"]["dropped"] >= 1  # once, not per drop
    # small feedback logs still fit their share
    infer(daemon, "small")
    status, body = post(daemon, "/v2/models/clf/feedback", {"id": "small", "label": 1})
    assert status == 200 and body["received"] == 1
    assert any(m.topic.endswith("/feedback") for m in spool.read(0, 1000))


def test_a_full_disk_answers_503_without_a_path_and_keeps_the_label(daemon: Daemon) -> None:
    assert daemon.telemetry is not None
    spool = daemon.telemetry.link.spool
    infer(daemon, "p1")
    daemon.quality.monitor.drain()
    # SQLite's page limit gives the SQLITE_FULL a full filesystem gives
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count = {pages}")
    try:
        for size in (1000, 100, 1):  # take what free room the pages still had
            with pytest.raises(SpoolFullError):
                for _ in range(10_000):
                    spool.put("filler/events", b"e" * size)
        status, body = post(daemon, "/v2/models/clf/feedback", {"id": "p1", "label": 0})
    finally:
        spool._db.execute("PRAGMA max_page_count = 1000000")
    assert status == 503, body
    assert "disk is full" in body["error"] and "/" not in body["error"], body
    assert str(spool.path.parent) not in json.dumps(body)
    # the label was applied: sending it again is a duplicate, not a new match
    status, body = post(daemon, "/v2/models/clf/feedback", {"id": "p1", "label": 0})
    assert status == 200 and body.get("duplicate") == 1, body
    assert daemon.quality.monitor._models["clf"].join.counts.matched == 1


def test_readiness_is_false_while_the_telemetry_forwarder_is_restarted(
    tmp_path: Path, model_factory: Any, broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_factory("classifier", n_features=4, n_classes=3, seed=2)
    config = parse_config(
        {
            "device_id": "dev-1",
            "state_dir": str(tmp_path / "state"),
            "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05},
            "updates": {"enabled": False},
            "api": {"listen": "127.0.0.1:0"},
            "models": [{"name": "clf", "path": str(model)}],
        },
        environ={},
    )
    d = build_daemon(config)
    d.start()
    try:
        assert d.telemetry is not None
        link = d.telemetry.link

        def ready() -> int:
            host, port = d.api.address
            conn = http.client.HTTPConnection(host, port, timeout=10)
            try:
                conn.request("GET", "/v2/health/ready")
                return conn.getresponse().status
            finally:
                conn.close()

        deadline = time.monotonic() + 10
        while not link.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready() == 200
        real_read = link.spool.read
        faults = iter([RuntimeError("an unexpected fault")])

        def faulty_read(after: int, limit: int) -> Any:
            fault = next(faults, None)
            if fault is not None:
                time.sleep(0.3)  # the fault takes a moment: readiness is asked meanwhile
                raise fault
            return real_read(after, limit)

        monkeypatch.setattr(link.spool, "read", faulty_read)
        link.emit_event("tick", "wake the forwarder")
        seen = set()
        deadline = time.monotonic() + 10
        while link.forwarder_restarts == 0 and time.monotonic() < deadline:
            seen.add(ready())
        assert link.forwarder_restarts == 1 and 503 in seen, seen
        deadline = time.monotonic() + 5
        while ready() != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready() == 200
    finally:
        d.stop()
