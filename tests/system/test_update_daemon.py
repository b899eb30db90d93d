"""Updates through a real ``inferd run``: push over MQTT, serve the new version, restart on it,
and a forged poke that can do nothing but make the device ask the repository."""

from __future__ import annotations

import time
import uuid

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Broker, EventListener
from tests.support.daemon import start_daemon
from tests.support.models import classifier
from tests.support.tuf_repo import FaultyServer
from updater.inferctl.main import main as inferctl


def _serving(daemon) -> str:
    status, body = daemon.request("GET", "/v2/models/classifier")
    assert status == 200
    return body["versions"][0]


def _wait_version(daemon, version: str, timeout: float = 20.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _serving(daemon) == version:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"still serving {_serving(daemon)} after {timeout}s:\n{daemon.stderr()}")


def test_push_forged_poke_and_restart(broker: Broker, tuf_repo, tmp_path):
    prefix = f"inferd-test-{uuid.uuid4().hex[:8]}"
    poke_topic = f"{prefix}/groups/kitchen/update"
    listener = EventListener(broker, prefix)
    evil = FaultyServer(tmp_path)
    config = {
        "groups": ["kitchen"],
        "models": [{"name": "classifier", "path": str(classifier(tmp_path / "v1.onnx"))}],
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "topic_prefix": prefix},
        "updates": {
            "repository_url": tuf_repo.url,
            "trusted_root": str(tuf_repo.trusted_root),
            "poll_interval_s": 3600,
            "check_on_start": False,
            "trial_window_s": 0.5,
            "validation_runs": 5,
        },
    }
    (tmp_path / "d").mkdir()
    daemon = start_daemon(tmp_path / "d", config)
    try:
        assert _serving(daemon) == "1"
        tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
        where = f"{broker.host}:{broker.port}"
        assert inferctl(["push", "--group", "kitchen", "--prefix", prefix, "--broker", where]) == 0
        took = _wait_version(daemon, "2")
        assert took < 10

        # a forged poke naming another server and version only triggers a check of the real repo
        tuf_repo.server.requests.clear()
        forged = {"repository_url": evil.url, "version": "99", "sha256": "0" * 64}
        c = mqtt.Client(CallbackAPIVersion.VERSION2)
        c.connect(broker.host, broker.port)
        c.loop_start()
        c.publish(poke_topic, msgspec.json.encode(forged), qos=1, retain=True).wait_for_publish(5)
        c.disconnect()
        c.loop_stop()
        deadline = time.monotonic() + 10
        while "/metadata/timestamp.json" not in tuf_repo.server.requests:
            assert time.monotonic() < deadline, "the forged poke did not trigger a check"
            time.sleep(0.05)
        time.sleep(0.5)
        assert evil.requests == []
        assert _serving(daemon) == "2"
        assert not [r for r in tuf_repo.server.requests if "/targets/" in r]

        # a restart serves the installed version straight away
        assert daemon.stop() == 0
        daemon = start_daemon(tmp_path / "d", config)
        assert _serving(daemon) == "2"
    finally:
        code = daemon.stop()
        listener.close()
        evil.stop()
    assert code == 0
    states = [e["details"].get("state") for e in listener.events if e["kind"] == "update"]
    assert "committed" in states, listener.events
