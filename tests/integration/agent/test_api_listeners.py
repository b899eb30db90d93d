"""Slot listeners on the HTTP path: told after the reply is sent, each request once, and a
listener that fails or is slow never costs the client its reply."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import Daemon
from agent.slots import Prediction
from tests.support.daemon import infer_demo

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "models" / "demo.onnx"


@pytest.fixture
def daemon(tmp_path: Path, in_process_daemon: Callable[[dict[str, Any]], Daemon]) -> Daemon:
    return in_process_daemon(
        {
            "device_id": "listeners",
            "state_dir": str(tmp_path / "state"),
            "models": [{"name": "demo", "path": str(DEMO)}],
            "api": {"listen": "127.0.0.1:0"},
            "mqtt": {"enabled": False},
        }
    )


def test_the_reply_does_not_wait_for_listeners(daemon: Daemon) -> None:
    release = threading.Event()
    told: list[Prediction] = []
    done = threading.Event()

    def slow(p: Prediction) -> None:
        release.wait(10)  # were listeners told before the reply, the client would wait on this
        told.append(p)
        done.set()

    daemon.slots["demo"].listeners.append(slow)
    host, port = daemon.api.address[:2]  # type: ignore[misc]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        status, body = infer_demo(conn, "r-1")
        assert status == 200 and body["id"] == "r-1"
        assert not told
        release.set()
        assert done.wait(5)
        assert [p.request_id for p in told] == ["r-1"]
        assert told[0].outputs is not None and told[0].error is None
    finally:
        release.set()
        conn.close()


def test_a_failing_listener_costs_neither_reply_nor_connection(daemon: Daemon) -> None:
    told: list[str] = []

    def failing(p: Prediction) -> None:
        raise RuntimeError("listener bug")

    slot = daemon.slots["demo"]
    slot.listeners[:0] = [failing]  # first: the listeners after it are still told
    slot.listeners.append(lambda p: told.append(p.request_id))
    host, port = daemon.api.address[:2]  # type: ignore[misc]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        for i in range(4):  # one keep-alive connection throughout
            status, body = infer_demo(conn, f"r-{i}")
            assert status == 200 and body["id"] == f"r-{i}"
        # a request's listeners run before its connection reads the next request
        assert told[:3] == ["r-0", "r-1", "r-2"]
    finally:
        conn.close()
