"""Feedback bodies and the label join: window edges by age and by count, nothing lost silently."""

from __future__ import annotations

import threading

import pytest

from telemetry.quality.feedback import FeedbackError, JoinWindow, Label, parse_feedback, to_label


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def window(max_age_s: float = 10.0, max_pending: int = 100) -> tuple[JoinWindow[str, str], Clock]:
    clock = Clock()
    return JoinWindow(max_age_s, max_pending, clock), clock


def test_label_inside_the_window_edge_matches() -> None:
    join, clock = window(max_age_s=10.0)
    assert join.add_prediction("r1", "pred1") is None
    clock.now += 10.0  # exactly at the edge: still inside
    assert join.add_label("r1", "cat") == ("matched", ("pred1", "cat"))
    assert join.counts.matched == 1
    assert join.pending_predictions == 0


def test_label_just_past_the_window_edge_is_late_and_counted() -> None:
    join, clock = window(max_age_s=10.0)
    join.add_prediction("r1", "pred1")
    clock.now += 10.001
    assert join.add_label("r1", "cat") == ("late", None)
    assert join.counts.late == 1
    assert join.counts.expired_predictions == 1
    assert join.counts.matched == 0


def test_label_before_prediction_waits_and_joins() -> None:
    join, clock = window(max_age_s=10.0)
    assert join.add_label("r1", "cat") == ("pending", None)
    assert join.pending_labels == 1
    clock.now += 9.0
    assert join.add_prediction("r1", "pred1") == ("pred1", "cat")
    assert join.counts.matched == 1
    assert join.pending_labels == 0


def test_early_label_whose_prediction_never_comes_counts_as_unknown() -> None:
    join, clock = window(max_age_s=10.0)
    join.add_label("ghost", "cat")
    clock.now += 10.5
    join.expire()
    assert join.counts.unknown == 1
    assert join.pending_labels == 0
    # the prediction turning up after the label expired is simply unlabelled
    assert join.add_prediction("ghost", "pred") is None


def test_count_bound_evicts_the_oldest_prediction() -> None:
    join, _ = window(max_pending=3)
    for i in range(4):
        join.add_prediction(f"r{i}", f"p{i}")
    assert join.pending_predictions == 3
    assert join.counts.evicted_predictions == 1
    assert join.add_label("r0", "x") == ("late", None)  # evicted at the count edge
    assert join.add_label("r1", "x") == ("matched", ("p1", "x"))  # the oldest one kept
    assert join.add_label("r3", "x")[0] == "matched"


def test_count_bound_on_early_labels() -> None:
    join, _ = window(max_pending=2)
    for i in range(3):
        join.add_label(f"r{i}", "x")
    assert join.pending_labels == 2
    assert join.counts.unknown == 1
    assert join.add_prediction("r0", "p0") is None  # its label was the one pushed out
    assert join.add_prediction("r1", "p1") == ("p1", "x")


def test_second_label_for_a_request_is_a_duplicate() -> None:
    join, _ = window()
    join.add_prediction("r1", "p")
    join.add_label("r1", "cat")
    assert join.add_label("r1", "dog") == ("duplicate", None)
    join.add_label("r2", "cat")
    assert join.add_label("r2", "dog") == ("duplicate", None)
    assert join.counts.duplicate == 2


def test_reused_request_id_labels_the_newer_prediction() -> None:
    join, _ = window()
    join.add_prediction("r1", "old")
    join.add_prediction("r1", "new")
    assert join.add_label("r1", "cat") == ("matched", ("new", "cat"))


def test_parse_label_forms() -> None:
    items = parse_feedback(
        b'[{"id": "a", "label": 2}, {"id": "b", "label": "dog"}, {"id": "c", "label": [0, "cat"]},'
        b' {"id": "d", "labels": ["cat", 2]}, {"id": "e", "labels": [[0], [1, 2]]},'
        b' {"id": "f", "value": 3.5}, {"id": "g", "value": [1, 2.5]}]'
    )
    names = ("cat", "dog", "eel")
    got = {i.id: to_label(i, names) for i in items}
    assert got["a"] == Label("class", (2,))
    assert got["b"] == Label("class", (1,))
    assert got["c"] == Label("class", (0, 0))
    assert got["d"] == Label("multilabel", ((0, 2),))
    assert got["e"] == Label("multilabel", ((0,), (1, 2)))
    assert got["f"] == Label("value", (3.5,))
    assert got["g"] == Label("value", (1.0, 2.5))
    single = parse_feedback(b'{"id": "z", "labels": []}')
    assert to_label(single[0]) == Label("multilabel", ((),))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{nope", "invalid feedback"),
        (b'{"label": 1}', "missing required field `id`"),
        (b'{"id": "a"}', "exactly one of label, labels, value"),
        (b'{"id": "a", "label": 1, "value": 2.0}', "exactly one of"),
        (b'{"id": "a", "label": 1, "extra": 2}', "unknown field"),
        (b'{"id": "a", "value": "high"}', "Expected `float | array`"),
    ],
)
def test_bad_bodies_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(FeedbackError, match=message):
        parse_feedback(body)


def test_unknown_class_name_is_rejected() -> None:
    (item,) = parse_feedback(b'{"id": "a", "label": "zebra"}')
    with pytest.raises(FeedbackError, match="unknown class name 'zebra'"):
        to_label(item, ("cat", "dog"))


# -- feedback over the daemon's HTTP API -----------------------------------------------------


@pytest.fixture
def daemon(tmp_path, model_factory):
    """An in-process daemon serving a classifier with reference stats beside it."""
    import numpy as np

    from agent.app import build_daemon
    from agent.config import parse_config
    from telemetry.quality.drift import compute_reference

    model = model_factory("classifier", n_features=4, n_classes=3, seed=2)
    ref = compute_reference({"x": np.random.default_rng(0).normal(size=(1000, 4))})
    model.with_suffix(".ref.json").write_bytes(ref.to_json())
    config = parse_config(
        {
            "device_id": "dev-1",
            "state_dir": str(tmp_path / "state"),
            "mqtt": {"enabled": False},
            "updates": {"enabled": False},
            "api": {"listen": "127.0.0.1:0"},
            "quality": {"publish_interval_s": 3600, "drift_window": 50},
            "models": [{"name": "clf", "path": str(model), "labels": ["cat", "dog", "eel"]}],
        },
        environ={},
    )
    d = build_daemon(config)
    d.start()
    yield d
    d.stop()
    assert not [t for t in threading.enumerate() if t.name == "inferd-quality"]


def http(daemon, method: str, path: str, body: object) -> tuple[int, dict]:
    import http.client
    import json

    host, port = daemon.api.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=json.dumps(body).encode())
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_http_feedback_joins_and_reports(daemon) -> None:
    import numpy as np

    x = np.random.default_rng(1).normal(size=(60, 4)).astype(np.float32)
    predicted = []
    for i in range(60):
        status, out = http(
            daemon,
            "POST",
            "/v2/models/clf/infer",
            {"id": f"req-{i}", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                           "data": x[i].tolist()}]},
        )  # fmt: skip
        assert status == 200 and out["id"] == f"req-{i}"
        predicted.append(int(np.argmax(out["outputs"][0]["data"])))
    truth = [p if i % 4 else (p + 1) % 3 for i, p in enumerate(predicted)]  # 75 % right
    body = [{"id": f"req-{i}", "label": ["cat", "dog", "eel"][t]} for i, t in enumerate(truth)]
    body.append({"id": "never-served", "label": 0})
    status, reply = http(daemon, "POST", "/v2/models/clf/feedback", body)
    assert status == 200
    assert reply["received"] == 61
    assert reply.get("matched", 0) + reply.get("pending", 0) == 61
    monitor = daemon.quality.monitor
    monitor.drain()
    (payload,) = monitor.payloads()
    assert payload.model == "clf" and payload.device == "dev-1"
    assert payload.samples == 60
    assert payload.classification.accuracy == pytest.approx(45 / 60)
    assert payload.drift is not None  # the reference beside the model file was found
    assert payload.feedback.matched == 60
    assert payload.feedback.pending_labels == 1  # "never-served" waits, then counts as unknown


def test_http_feedback_errors_are_4xx_with_the_reason(daemon) -> None:
    status, reply = http(daemon, "POST", "/v2/models/clf/feedback", {"id": "a"})
    assert status == 400
    assert "exactly one of label, labels, value" in reply["error"]
    status, reply = http(daemon, "POST", "/v2/models/clf/feedback", {"id": "a", "label": "yak"})
    assert status == 400 and "unknown class name 'yak'" in reply["error"]
    status, reply = http(daemon, "POST", "/v2/models/nope/feedback", {"id": "a", "label": 1})
    assert status == 404


# -- feedback and quality over a real MQTT link ----------------------------------------------


def test_cmd_feedback_over_mqtt_and_quality_published(tmp_path, broker, capture_factory) -> None:
    import json
    import time

    import jsonschema
    import numpy as np
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from agent.config import parse_config
    from agent.mqtt.link import MqttLink
    from agent.quality import QualityService
    from agent.slots import ModelSlot
    from telemetry import schemas
    from telemetry.payloads import HostFacts, Status, utc_now
    from tests.support.models import classifier

    model = classifier(tmp_path / "clf.onnx", n_features=4, n_classes=3)
    cfg = parse_config(
        {
            "device_id": "dev1",
            "state_dir": str(tmp_path / "state"),
            "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05},
            "quality": {"publish_interval_s": 0.1},
            "models": [{"name": "clf", "path": str(model)}],
        },
        environ={},
    )
    slot = ModelSlot(cfg.models[0])
    slot.swap(slot.load(model, "4"))
    status = Status(
        device="dev1", groups=[], agent_version="t", started_at=utc_now(), models=[],
        host=HostFacts(hostname="h", arch="x86_64", os="Linux", python="3"),
    )  # fmt: skip
    link = MqttLink(cfg, lambda: status)
    service = QualityService(cfg, {"clf": slot}, link)
    cap = capture_factory(broker, "replies/#", "inferd/dev1/quality", "inferd/dev1/feedback")
    link.start()
    service.start()
    try:
        deadline = time.monotonic() + 10
        while not link.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        out, _, _ = slot.predict({"x": np.ones((1, 4), np.float32)}, request_id="m-1")
        label = int(out["probs"].argmax())
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "replies/me"
        props.CorrelationData = b"c-1"
        body = json.dumps({"id": "m-1", "label": label}).encode()  # model left out: one slot
        cap.client.publish("inferd/dev1/cmd/feedback", body, qos=1, properties=props)
        assert cap.wait(lambda: bool(cap.on("replies/me")))
        reply = json.loads(cap.on("replies/me")[0].payload)
        assert reply["ok"] is True
        assert reply["result"]["results"][0]["id"] == "m-1"
        cap.client.publish(
            "inferd/dev1/cmd/feedback", b'{"model": "zzz", "id": "x", "label": 1}', qos=1,
            properties=props,
        )  # fmt: skip
        assert cap.wait(lambda: len(cap.on("replies/me")) == 2)
        assert "model 'zzz' not found" in json.loads(cap.on("replies/me")[1].payload)["error"]

        # labels that came over HTTP go to the broker too, for inferctl collect
        service.http_feedback("clf", b'[{"id": "h-1", "value": 2.5}]')
        assert cap.wait(lambda: bool(cap.on("feedback")))
        logged = json.loads(cap.on("feedback")[0].payload)
        jsonschema.validate(logged, schemas.load("feedback"))
        assert logged["model"] == "clf" and logged["device"] == "dev1"
        assert logged["items"] == [{"id": "h-1", "value": 2.5}]

        def accurate() -> bool:
            payloads = [json.loads(m.payload) for m in cap.on("quality")]
            return any(p["samples"] == 1 for p in payloads)

        assert cap.wait(accurate)
        last = json.loads(cap.on("quality")[-1].payload)
        assert last["model"] == "clf" and last["version"] == "4"
        assert last["classification"]["accuracy"] == 1.0
    finally:
        service.stop()
        link.stop(timeout=1)
        slot.close()


def test_quality_gauges_on_prometheus_metrics(daemon) -> None:
    from http.client import HTTPConnection

    import numpy as np

    x = np.zeros(4, np.float32).tolist()
    status, out = http(
        daemon,
        "POST",
        "/v2/models/clf/infer",
        {"id": "p1", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x}]},
    )
    assert status == 200
    top = int(np.argmax(out["outputs"][0]["data"]))
    http(daemon, "POST", "/v2/models/clf/feedback", {"id": "p1", "label": top})
    http(daemon, "POST", "/v2/models/clf/feedback", {"id": "p1", "label": top})  # duplicate
    daemon.quality.monitor.drain()
    host, port = daemon.api.address
    conn = HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    assert "# TYPE inferd_quality_accuracy gauge" in text
    assert 'inferd_quality_accuracy{model="clf",version="1",task="classification"} 1.0' in text
    assert 'inferd_feedback_labels_total{model="clf",outcome="matched"} 1' in text
    assert 'inferd_feedback_labels_total{model="clf",outcome="duplicate"} 1' in text
