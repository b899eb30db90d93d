"""An MQTT client allowed only to ask for inference cannot make a device command itself.

The attack reproduced in issue 13: a device on v2 (v1 still on disk), an inference request
``{"inputs": []}`` whose MQTT 5 response topic is the device's own ``cmd/rollback``. The device
answered 400 there, read its own reply as a rollback of every slot and went back to v1. Here
the reply must not be published there, nothing may roll back, and the refusal is evented; a
rollback without a model, or replayed from a retained message, is refused too, while an
explicit one still works (so the checks above could fail).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.broker import Broker, Capture
from tests.support.daemon import DaemonProc, start_daemon
from tests.support.models import classifier
from tests.support.waits import wait_until
from updater.inferctl.main import main as inferctl

DEVICE = "dev-deputy"


def _serving(daemon: DaemonProc) -> str:
    status, body = daemon.request("GET", "/v2/models/classifier")
    assert status == 200, body
    return str(body["versions"][0])


def _events(cap: Capture, kind: str) -> list[dict[str, Any]]:
    found = [json.loads(m.payload) for m in cap.on("/events")]
    return [e for e in found if e["kind"] == kind]


def _send(cap: Capture, topic: str, body: bytes, reply: str | None, corr: bytes = b"c") -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if reply is not None:
        props.ResponseTopic = reply
        props.CorrelationData = corr
    cap.client.publish(topic, body, qos=1, properties=props).wait_for_publish(5)


def test_a_reply_cannot_roll_the_device_back(
    broker: Broker, tuf_repo: Any, tmp_path: Path, capture_factory: Any
) -> None:
    prefix = f"inferd-{uuid.uuid4().hex[:8]}"
    root = f"{prefix}/{DEVICE}"
    config = {
        "device_id": DEVICE,
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
    cap = capture_factory(broker, f"{root}/#", "replies/#")
    daemon = start_daemon(tmp_path / "d", config)
    try:
        tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
        where = f"{broker.host}:{broker.port}"
        assert inferctl(["push", "--group", "kitchen", "--prefix", prefix, "--broker", where]) == 0
        assert wait_until(lambda: _serving(daemon) == "2", 15), daemon.stderr()

        def committed() -> bool:
            return any(e["details"].get("state") == "committed" for e in _events(cap, "update"))

        assert wait_until(committed, 15), daemon.stderr()

        # The deputy attack: an empty request, answered 400, with the reply aimed at cmd/rollback.
        _send(cap, f"{root}/infer/classifier", b'{"inputs": []}', f"{root}/cmd/rollback")
        # Other topics a requester must not get a reply onto: a group, another device's
        # commands, this device's telemetry, a topic outside the allowed prefixes.
        for i, topic in enumerate((
            f"{prefix}/groups/kitchen/rollback",
            f"{prefix}/other-device/cmd/rollback",
            f"{root}/status",
            "elsewhere/x",
        )):  # fmt: skip
            _send(cap, f"{root}/infer/classifier", b'{"inputs": []}', topic, b"x%d" % i)
        # A legitimate request after them: once its reply is here, the device has handled the
        # ones before (one dispatch thread, in order).
        _send(cap, f"{root}/infer/classifier", b'{"inputs": []}', "replies/app", b"last")
        assert cap.wait(lambda: bool(cap.on("replies/app")), 10), daemon.stderr()
        reply = cap.on("replies/app")[0]
        assert ("status", "400") in reply.properties.UserProperty  # type: ignore[attr-defined]
        time.sleep(1.0)  # a rollback, had one been requested, starts within milliseconds
        assert cap.on("/cmd/rollback") == []
        assert [m.payload for m in cap.on("/status") if b'"error"' in m.payload] == []
        assert _serving(daemon) == "2"
        assert not _events(cap, "rollback")
        assert not [e for e in _events(cap, "update") if e["details"].get("state") == "rolled_back"]
        refused = _events(cap, "reply-refused")
        assert refused and "cmd/rollback" in refused[0]["message"], daemon.stderr()
        assert daemon.stderr().count("refused to reply") == 1  # once a minute, not per request

        # Asked directly, a rollback must name the model.
        _send(cap, f"{root}/cmd/rollback", b"{}", "replies/op", b"r1")
        assert cap.wait(lambda: bool(cap.on("replies/op")), 10)
        answer = json.loads(cap.on("replies/op")[0].payload)
        assert answer["ok"] is False and "model" in answer["error"]
        assert _serving(daemon) == "2"

        # A retained group rollback is refused when it is replayed on the next connection.
        # Published while the device is down: a connected device would get it live (not
        # retained), which is an operator's rollback and is obeyed.
        assert daemon.stop() == 0
        cap.client.publish(
            f"{prefix}/groups/kitchen/rollback", b'{"model": "classifier"}', qos=1, retain=True
        ).wait_for_publish(5)
        daemon = start_daemon(tmp_path / "d", config)
        failed = lambda: _events(cap, "command-failed")  # noqa: E731
        assert wait_until(lambda: any("retained" in e["message"] for e in failed()), 15), (
            daemon.stderr()
        )
        assert _serving(daemon) == "2"

        # An explicit rollback does what it says: the checks above would have seen one.
        _send(cap, f"{root}/cmd/rollback", b'{"model": "classifier"}', "replies/op", b"r2")
        assert wait_until(lambda: _serving(daemon) == "1", 15), daemon.stderr()
    finally:
        cap.client.publish(f"{prefix}/groups/kitchen/rollback", b"", qos=1, retain=True)
        code = daemon.stop()
    assert code == 0, daemon.stderr()
