"""Quality metrics equal scikit-learn's on random data; rolling windows forget by count and age."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from sklearn import metrics as skm

from agent.config import ModelConfig
from agent.slots import ModelSlot
from telemetry.config import QualityConfig
from telemetry.quality.drift import compute_reference
from telemetry.quality.monitor import QualityMonitor
from telemetry.quality.scores import (
    binary_roc_auc,
    classification_quality,
    multilabel_quality,
    regression_quality,
)
from telemetry.quality.window import QualityWindow, Sample
from tests.support.models import save

DEMO = Path(__file__).resolve().parents[3] / "examples" / "models"
SETTINGS = settings(max_examples=60, deadline=None)
# scikit-learn warns when a random draw has one class only; those draws are still compared
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")


@st.composite
def class_data(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_classes = draw(st.integers(2, 6))
    n = draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_classes, size=n)
    # coarse scores make ties likely, which is where ROC-AUC implementations differ
    logits = np.round(rng.normal(size=(n, n_classes)) + np.eye(n_classes)[y_true], 1)
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y_pred = scores.argmax(axis=1)
    return y_true, y_pred, scores


@SETTINGS
@given(class_data())
def test_classification_metrics_equal_sklearn(data: tuple[np.ndarray, ...]) -> None:
    y_true, y_pred, scores = data
    q = classification_quality(y_true, y_pred, scores, max_classes=50)
    assert q.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))
    for ours, avg in (("precision_macro", "macro"),):
        assert getattr(q, ours) == pytest.approx(
            skm.precision_score(y_true, y_pred, average=avg, zero_division=0)
        )
    assert q.recall_macro == pytest.approx(
        skm.recall_score(y_true, y_pred, average="macro", zero_division=0)
    )
    assert q.f1_macro == pytest.approx(
        skm.f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    labels = np.union1d(y_true, y_pred)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert [c.label for c in q.per_class] == [str(c) for c in labels]
    assert [c.precision for c in q.per_class] == pytest.approx(p)
    assert [c.recall for c in q.per_class] == pytest.approx(r)
    assert [c.f1 for c in q.per_class] == pytest.approx(f)
    assert [c.support for c in q.per_class] == list(s)
    assert q.confusion == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()

    # one-vs-rest ROC-AUC per class, wherever scikit-learn defines it
    for c in q.per_class:
        k = int(c.label)
        present = 0 < (y_true == k).sum() < y_true.size
        if present:
            assert c.roc_auc == pytest.approx(skm.roc_auc_score(y_true == k, scores[:, k]))
        else:
            assert c.roc_auc is None
    n_classes = scores.shape[1]
    if set(y_true.tolist()) == set(range(n_classes)):
        if n_classes == 2:
            expected = skm.roc_auc_score(y_true, scores[:, 1])
        else:
            expected = skm.roc_auc_score(
                y_true, scores, multi_class="ovr", average="macro", labels=range(n_classes)
            )
        assert q.roc_auc == pytest.approx(expected)


@SETTINGS
@given(
    st.integers(1, 60),
    st.integers(2, 5),  # one column is binary classification to scikit-learn
    st.integers(0, 2**32 - 1),
)
def test_multilabel_metrics_equal_sklearn(n: int, n_labels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, size=(n, n_labels))
    scores = np.round(np.clip(0.3 * rng.normal(size=(n, n_labels)) + 0.4 * y_true + 0.3, 0, 1), 1)
    y_pred = (scores >= 0.5).astype(int)
    q = multilabel_quality(y_true, y_pred, scores)
    assert q.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert q.precision_macro == pytest.approx(
        skm.precision_score(y_true, y_pred, average="macro", zero_division=0)
    )
    assert q.recall_macro == pytest.approx(
        skm.recall_score(y_true, y_pred, average="macro", zero_division=0)
    )
    assert q.f1_macro == pytest.approx(
        skm.f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    defined = [j for j in range(n_labels) if 0 < y_true[:, j].sum() < n]
    if len(defined) == n_labels:
        assert q.roc_auc == pytest.approx(skm.roc_auc_score(y_true, scores, average="macro"))
    for j in defined:
        assert q.per_class[j].roc_auc == pytest.approx(
            skm.roc_auc_score(y_true[:, j], scores[:, j])
        )


@SETTINGS
@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)), min_size=1, max_size=50))
def test_regression_metrics_equal_sklearn(pairs: list[tuple[float, float]]) -> None:
    y_true = np.array([a for a, _ in pairs])
    y_pred = np.array([b for _, b in pairs])
    q = regression_quality(y_true, y_pred)
    assert q.mae == pytest.approx(skm.mean_absolute_error(y_true, y_pred), abs=1e-9)
    assert q.rmse == pytest.approx(math.sqrt(skm.mean_squared_error(y_true, y_pred)), abs=1e-9)
    assert q.bias == pytest.approx(float(np.mean(y_pred - y_true)), abs=1e-9)


def test_roc_auc_undefined_for_one_class() -> None:
    assert binary_roc_auc(np.array([1, 1, 1]), np.array([0.1, 0.5, 0.9])) is None
    assert binary_roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5


def test_per_class_is_capped_to_the_largest_classes() -> None:
    y_true = np.array([0] * 5 + [1] * 3 + [2] * 1 + [3] * 2)
    q = classification_quality(
        y_true, y_true, label_names=["cat", "dog", "eel", "fox"], max_classes=2
    )
    assert [c.label for c in q.per_class] == ["cat", "dog"]
    assert q.confusion is None  # 4 classes > max_classes
    assert q.f1_macro == 1.0  # the macro average still covers every class


def test_window_forgets_by_count_and_by_age() -> None:
    now = [1000.0]
    win = QualityWindow("classification", max_count=4, max_age_s=10.0, clock=lambda: now[0])
    for i in range(6):
        win.add(Sample(ts=1000.0 + i, truth=i % 2, predicted=0))
    assert len(win) == 4  # count bound: samples 2..5
    q = win.compute()
    assert q is not None
    assert q.accuracy == 0.5
    now[0] = 1013.5  # samples at 1002 and 1003 are now older than 10 s
    assert len(win) == 2
    now[0] = 1100.0
    assert win.compute() is None


# -- the monitor on a real model slot --------------------------------------------------------


@pytest.fixture
def served(model_factory):
    """A real classifier in a slot with a QualityMonitor listening: (slot, monitor, sent)."""

    path = model_factory("classifier", n_features=4, n_classes=3, seed=3)
    slot = ModelSlot(ModelConfig(name="clf", path=str(path), labels=("cat", "dog", "eel")))
    slot.swap(slot.load(path, "v1"))
    sent: dict[str, list] = {"quality": [], "events": []}

    def emit_event(kind, message, **fields) -> None:
        sent["events"].append({"kind": kind, "message": message, **fields})

    settings = QualityConfig(publish_interval_s=3600, drift_window=200, window_count=10_000)
    monitor = QualityMonitor(
        settings,
        "dev-1",
        sent["quality"].append,
        emit_event=emit_event,
        labels={"clf": slot.config.labels},
    )
    slot.listeners.append(monitor.listener)
    yield slot, monitor, sent
    monitor.stop()
    slot.close()


def test_monitor_quality_equals_sklearn_on_served_predictions(served) -> None:
    slot, monitor, _ = served
    rng = np.random.default_rng(7)
    y_true, y_pred, scores = [], [], []
    for i in range(40):
        batch = 1 + i % 3
        x = rng.normal(size=(batch, 4)).astype(np.float32)
        out, _, rid = slot.predict({"x": x}, request_id=f"req-{i}")
        truth = rng.integers(0, 3, size=batch).tolist()
        y_true += truth
        y_pred += out["probs"].argmax(axis=1).tolist()
        scores.append(out["probs"])
        # half the labels by name, half by index; some overtake their prediction in the queue
        label = [("cat", "dog", "eel")[t] for t in truth] if i % 2 else truth
        body = msgspec.json.encode({"id": rid, "label": label})
        reply = monitor.feedback("clf", body)
        assert reply["results"][0]["status"] == "pending"  # the worker has not run yet
    monitor.drain()
    (payload,) = monitor.payloads()
    q = payload.classification
    assert payload.model == "clf" and payload.version == "v1" and payload.device == "dev-1"
    assert payload.task == "classification"
    assert payload.samples == len(y_true)
    assert q.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert q.f1_macro == pytest.approx(
        skm.f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    expected_auc = skm.roc_auc_score(y_true, np.concatenate(scores), multi_class="ovr")
    assert q.roc_auc == pytest.approx(expected_auc)
    assert [c.label for c in q.per_class] == ["cat", "dog", "eel"]
    assert payload.feedback.matched == 40
    assert payload.feedback.unmatched == 0


def test_monitor_counts_labels_that_do_not_fit(served) -> None:
    slot, monitor, _ = served
    slot.predict({"x": np.zeros((2, 4), np.float32)}, request_id="two-rows")
    monitor.drain()
    reply = monitor.feedback("clf", b'{"id": "two-rows", "value": 1.5}')
    assert reply["results"][0]["status"] == "invalid"
    assert reply["results"][0]["error"] == "label has 1 row(s), the prediction has 2"
    slot.predict({"x": np.zeros((1, 4), np.float32)}, request_id="one-row")
    monitor.drain()
    reply = monitor.feedback("clf", b'{"id": "one-row", "value": 1.5}')
    assert "needs one output value per row, not 3" in reply["results"][0]["error"]
    reply = monitor.feedback("clf", b'{"id": "never-seen", "label": 1}')
    assert reply["results"][0]["status"] == "pending"
    (payload,) = monitor.payloads() or [None]
    assert payload is None  # nothing valid and no drift: nothing to publish


def test_monitor_regression_and_publish_thread(model_factory, tmp_path) -> None:

    w = np.array([[2.0], [-1.0]], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "regressor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    path = save(graph, tmp_path / "reg.onnx")
    slot = ModelSlot(ModelConfig(name="reg", path=str(path)))
    slot.swap(slot.load(path, "7"))
    published = []
    got_one = threading.Event()

    def publish(payload) -> None:
        published.append(payload)
        if payload.samples == 3:
            got_one.set()

    monitor = QualityMonitor(QualityConfig(publish_interval_s=0.05), "dev-1", publish)
    slot.listeners.append(monitor.listener)
    monitor.start()
    try:
        x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
        slot.predict({"x": x}, request_id="r")  # predictions 2, -1, 1
        reply = monitor.feedback("reg", b'{"id": "r", "value": [2.5, -1.0, 0.0]}')
        assert reply["results"][0]["status"] in ("pending", "matched")  # races the worker
        assert got_one.wait(5)
    finally:
        monitor.stop()
        slot.close()
    assert not any(t.name == "inferd-quality" for t in threading.enumerate())
    last = published[-1]
    assert last.task == "regression"
    assert last.regression.mae == pytest.approx((0.5 + 0 + 1) / 3)
    assert last.regression.rmse == pytest.approx(math.sqrt((0.25 + 0 + 1) / 3))
    assert last.regression.bias == pytest.approx((-0.5 + 0 + 1) / 3)


def test_monitor_raises_a_drift_event_without_labels(served) -> None:
    slot, monitor, sent = served
    rng = np.random.default_rng(11)
    monitor.set_reference("clf", "v1", compute_reference({"x": rng.normal(size=(2000, 4))}))
    for _ in range(20):
        slot.predict({"x": rng.normal(size=(10, 4)).astype(np.float32)})
    monitor.drain()
    assert sent["events"] == []  # first window matches the reference
    for _ in range(20):
        x = rng.normal(size=(10, 4)).astype(np.float32)
        x[:, 2] += 1.5
        slot.predict({"x": x})
    monitor.drain()
    (event,) = sent["events"]
    assert event["kind"] == "drift" and event["level"] == "warning"
    assert event["model"] == "clf" and event["version"] == "v1"
    assert "x[2]" in event["message"]
    assert event["drifted"] is True and event["features"][0]["index"] == 2
    (payload,) = monitor.payloads()
    assert payload.task is None and payload.samples == 0
    assert payload.drift.drifted and payload.drift.features[0].index == 2


def test_quality_payload_matches_its_committed_json_schema(served) -> None:
    import jsonschema

    from telemetry import schemas
    from telemetry.payloads import QualityPayload

    assert schemas.load("quality") == json.loads(schemas.render(QualityPayload))
    slot, monitor, _ = served
    rng = np.random.default_rng(5)
    monitor.set_reference("clf", "v1", compute_reference({"x": rng.normal(size=(500, 4))}))
    for i in range(30):
        slot.predict({"x": rng.normal(size=(10, 4)).astype(np.float32)}, request_id=f"q{i}")
        monitor.feedback("clf", msgspec.json.encode({"id": f"q{i}", "label": [i % 3] * 10}))
    monitor.drain()
    (payload,) = monitor.payloads()
    assert payload.drift is not None and payload.classification is not None
    wire = json.loads(msgspec.json.encode(payload))
    jsonschema.validate(wire, schemas.load("quality"))
    assert wire["schema_version"] == 1 and wire["ts"].endswith("Z")


def test_feedback_command_schema_accepts_what_the_device_accepts() -> None:
    import jsonschema

    from telemetry import schemas
    from telemetry.payloads import FeedbackCommand
    from telemetry.quality.feedback import parse_command

    schema = schemas.load("cmd-feedback")
    assert schema == json.loads(schemas.render(FeedbackCommand))
    for body in (
        {"model": "clf", "id": "r1", "label": "cat"},
        {"items": [{"id": "r1", "labels": [0, 2]}, {"id": "r2", "value": 1.5}]},
    ):
        jsonschema.validate(body, schema)
        parse_command(body)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"model": "clf", "id": "r1", "label": 1, "extra": 1}, schema)


def test_real_daemon_publishes_valid_quality_payloads(broker, capture_factory, inferd_daemon):
    """`inferd run` end to end: infer over HTTP, label over MQTT, quality on the broker.

    The broker comes first among the fixtures so that it outlives the daemon.
    """
    import jsonschema

    from telemetry import schemas

    cap = capture_factory(broker, "inferd/qd/quality", "inferd/qd/status")
    d = inferd_daemon(
        {
            "device_id": "qd",
            "mqtt": {"enabled": True, "host": broker.host, "port": broker.port},
            "quality": {"publish_interval_s": 0.2},
            "telemetry": {"prediction_batch_ms": 50},
            "updates": {"enabled": False},
            "models": [{"name": "classifier", "path": str(DEMO / "demo.onnx"),
                        "labels": ["idle", "walking", "running"]}],
        }
    )  # fmt: skip
    golden = np.load(DEMO / "demo.golden.npz")
    for i, row in enumerate(golden["x"]):
        status, _ = d.infer(
            "classifier",
            [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": row.tolist()}],
            id=f"g{i}",
        )
        assert status == 200
    truth = golden["probs"].argmax(axis=1)
    items = [{"id": f"g{i}", "label": int(t)} for i, t in enumerate(truth)]
    # the birth status comes after the device subscribed: from then on commands are heard
    assert cap.wait(lambda: bool(cap.on("status")), timeout=15), d.stderr()
    cap.client.publish(
        "inferd/qd/cmd/feedback", json.dumps({"model": "classifier", "items": items}), qos=1
    )

    def labelled() -> bool:
        return any(json.loads(m.payload)["samples"] == len(items) for m in cap.on("quality"))

    assert cap.wait(labelled, timeout=15), d.stderr()
    payload = next(
        json.loads(m.payload)
        for m in cap.on("quality")
        if json.loads(m.payload)["samples"] == len(items)
    )
    jsonschema.validate(payload, schemas.load("quality"))
    assert payload["classification"]["accuracy"] == 1.0  # golden outputs are the model's own
    assert [c["label"] for c in payload["classification"]["per_class"]] == sorted(
        {("idle", "walking", "running")[t] for t in truth}, key=("idle", "walking", "running").index
    )


def test_feedback_log_schema_is_committed() -> None:
    from telemetry import schemas
    from telemetry.payloads import FeedbackLog

    assert schemas.load("feedback") == json.loads(schemas.render(FeedbackLog))


def test_drift_of_a_replaced_version_is_no_longer_reported(served) -> None:
    slot, monitor, _ = served
    rng = np.random.default_rng(8)
    ref = compute_reference({"x": rng.normal(size=(1000, 4))})
    monitor.set_reference("clf", "v1", ref)
    monitor.set_reference("clf", "v2", ref)
    for _ in range(20):
        slot.predict({"x": rng.normal(size=(10, 4)).astype(np.float32)})
    monitor.drain()
    assert [p.version for p in monitor.payloads()] == ["v1"]
    slot.swap(slot.load(slot.current.path, "v2"))
    for _ in range(20):
        slot.predict({"x": rng.normal(size=(10, 4)).astype(np.float32)})
    monitor.drain()
    assert [p.version for p in monitor.payloads()] == ["v2"]
