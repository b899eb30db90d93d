"""Every thread a running daemon starts is named ``inferd-*``; stopping it joins them all.

The daemon runs in this process with every part that starts threads: the API (one request
answered), the MQTT link and its inference pool (one request answered), telemetry, the quality
monitor and the update loop. The autouse leak check (tests/conftest.py) then fails the
test if ``Daemon.stop`` left any of them running.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from pathlib import Path

from agent.app import build_daemon
from agent.config import parse_config
from tests.support.broker import Broker, Capture
from tests.support.tuf_repo import TufRepo
from tests.support.waits import wait_until


def test_every_daemon_thread_is_named_inferd_and_stop_joins_them(
    tmp_path: Path,
    broker: Broker,
    tuf_repo: TufRepo,
    model_factory: Callable[..., Path],
    capture_factory: Callable[..., Capture],
) -> None:
    config = parse_config(
        {
            "device_id": "threads",
            "state_dir": str(tmp_path / "state"),
            "models": [{"name": "clf", "path": str(model_factory("classifier"))}],
            "api": {"listen": "127.0.0.1:0"},
            "mqtt": {"host": broker.host, "port": broker.port},
            "updates": {
                "repository_url": tuf_repo.url,
                "trusted_root": str(tuf_repo.trusted_root),
                # the update loop runs but asks nothing: the repository's own request threads
                # (this test's HTTP server) must not be taken for the daemon's
                "check_on_start": False,
            },
        },
        environ={},
    )
    reply_topic = "inferd/threads/infer/clf/reply"
    capture = capture_factory(broker, reply_topic)
    before = set(threading.enumerate())
    daemon = build_daemon(config)
    daemon.start()
    try:
        assert daemon.telemetry is not None
        link = daemon.telemetry.link
        assert wait_until(lambda: link.connected), "the daemon never connected to the broker"
        request = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                               "data": [0.1, 0.2, 0.3, 0.4]}]}  # fmt: skip
        # the link subscribes right after it connects: ask again until the answer comes
        for _ in range(20):
            capture.client.publish("inferd/threads/infer/clf", json.dumps(request), qos=1)
            if capture.wait(lambda: bool(capture.on("infer/clf/reply")), 0.5):
                break
        assert capture.on("infer/clf/reply"), "no MQTT reply"
        host, port = daemon.api.address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/v2/health/ready")
            assert conn.getresponse().read() is not None
            started = [t for t in threading.enumerate() if t not in before]
        finally:
            conn.close()
    finally:
        daemon.stop()
    names = sorted(t.name for t in started)
    # the parts above really ran threads of their own: each role shows up
    for role in (
        "inferd-api",
        "inferd-mqtt",
        "inferd-mqtt-infer",
        "inferd-quality",
        "inferd-update",
    ):
        assert any(n.startswith(role) for n in names), f"no {role} thread among {names}"
    assert [n for n in names if not n.startswith("inferd-")] == []
