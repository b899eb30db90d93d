"""``inferctl collect``: prediction logs and labels from a real broker or a capture to a dataset."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgspec
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from telemetry.broker import BrokerOptions
from telemetry.payloads import PredictionBatch, PredictionRecord, TensorDump
from tests.support.net import free_port
from updater.inferctl.main import main
from updater.operator.collect import Collector, parse_time, subscribe, write

T0 = datetime(2025, 5, 1, 12, 0, tzinfo=timezone.utc)


def batch(device: str, *records: tuple[str, list[list[float]], float]) -> bytes:
    """A predictions payload: (request id, input rows, seconds after T0) per record."""
    recs = [
        PredictionRecord(
            ts=T0 + timedelta(seconds=dt),
            model="clf",
            version="3",
            request_id=rid,
            latency_ms=0.4,
            input_digest="d" * 16,
            inputs_tensors={
                "x": TensorDump(
                    datatype="FP32", shape=[len(rows), 2], data=[v for r in rows for v in r]
                )
            },
        )
        for rid, rows, dt in records
    ]
    return msgspec.json.encode(PredictionBatch(device=device, records=recs))


class Publisher:
    def __init__(self, host: str, port: int, protocol: int = mqtt.MQTTv5) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.connect(host, port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker):
    p = Publisher(broker.host, broker.port)
    yield p
    p.close()


def collect_live(broker, prefix: str, send, done=lambda c: True, **kw) -> Collector:
    """Run ``subscribe`` in a thread, call ``send`` once subscribed, stop once ``done(c)``."""
    collector = Collector(prefix=prefix)
    ready = threading.Event()
    stop = threading.Event()
    opts = BrokerOptions(host=broker.host, port=broker.port)
    worker = threading.Thread(
        target=subscribe,
        args=(collector, opts),
        kwargs={"ready": ready.set, "stop": stop, "duration_s": 10, **kw},
        name="test-collect",
    )
    worker.start()
    try:
        assert ready.wait(5)
        send()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not done(collector):
            time.sleep(0.02)
    finally:
        stop.set()
        worker.join(5)
    assert not worker.is_alive()
    return collector


def test_live_predictions_and_labels_become_an_npz(broker, publisher, tmp_path) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}"

    def send() -> None:
        publisher.send(f"{prefix}/pi-1/predictions", batch("pi-1", ("a", [[1, 2]], 1)))
        publisher.send(
            f"{prefix}/pi-1/predictions",
            batch("pi-1", ("b", [[3, 4], [5, 6]], 2), ("c", [[7, 8]], 3)),
        )
        publisher.send(f"{prefix}/pi-1/predictions", batch("pi-1", ("a", [[1, 2]], 1)))  # again
        publisher.send(f"{prefix}/pi-1/cmd/feedback", b'{"model": "clf", "id": "a", "label": 2}')
        publisher.send(
            f"{prefix}/pi-1/cmd/feedback",
            b'{"items": [{"id": "b", "label": [0, 1]}, {"id": "zz", "label": 1}]}',
        )
        publisher.send(f"{prefix}/pi-1/status", b'{"state": "online"}')  # not ours

    collector = collect_live(broker, prefix, send, lambda c: len(c.labels) == 3)
    assert collector.duplicates == 1
    assert collector.unmatched_labels == 1  # "zz" has no record
    written = write(collector, tmp_path / "out", "npz", labelled_only=False)
    assert written == {"clf.npz": 4}
    data = np.load(tmp_path / "out" / "clf.npz")
    np.testing.assert_array_equal(data["x"], [[1, 2], [3, 4], [5, 6], [7, 8]])
    np.testing.assert_array_equal(data["y"], [2, 0, 1, -1])  # c has no label
    assert data["request_id"].tolist() == ["a", "b", "b", "c"]
    assert data["device"].tolist() == ["pi-1"] * 4
    assert data["x"].dtype == np.float32

    written = write(collector, tmp_path / "only", "jsonl", labelled_only=True)
    lines = [json.loads(x) for x in (tmp_path / "only" / "dataset.jsonl").read_text().splitlines()]
    assert written == {"dataset.jsonl": 2}
    assert [(r["request_id"], r["label"]) for r in lines] == [
        ("a", {"label": 2}),
        ("b", {"label": [0, 1]}),
    ]
    assert lines[0]["inputs"]["x"]["data"] == [1.0, 2.0]


def test_persistent_session_keeps_what_arrives_between_runs(broker, publisher, tmp_path) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    session = f"collect-{uuid.uuid4().hex[:8]}"
    first = collect_live(broker, prefix, lambda: None, session=session)
    assert not first.records
    # collect is not running now; the broker queues for its session
    publisher.send(f"{prefix}/pi-2/predictions", batch("pi-2", ("q", [[0, 1]], 0)))
    publisher.send(f"{prefix}/pi-2/cmd/feedback", b'{"id": "q", "value": 0.5}')
    second = collect_live(broker, prefix, lambda: None, lambda c: c.labels, session=session)
    assert ("pi-2", "clf", "q") in second.records
    assert second.labels[("pi-2", "clf", "q")].value == 0.5  # model taken from the record


def test_cli_replays_a_mosquitto_sub_capture_with_since(capsys, tmp_path) -> None:
    capture = tmp_path / "capture.log"
    old = batch("pi-1", ("old", [[0, 0]], -3600))
    new = batch("pi-1", ("new", [[1, 1]], 10), ("new2", [[2, 2]], 11))
    capture.write_text(
        f"inferd/pi-1/predictions {old.decode()}\n"
        f"inferd/pi-1/predictions {new.decode()}\n"
        'inferd/pi-1/cmd/feedback {"model": "clf", "id": "new", "value": 1.5}\n'
        'inferd/pi-1/cmd/feedback {"model": "clf", "id": "old", "value": 9}\n'
        'inferd/pi-1/feedback {"schema_version": 1, "ts": "2025-05-01T12:00:11Z", "device": "pi-1",'
        ' "model": "clf", "items": [{"id": "new2", "value": 0.5}]}\n'
        + json.dumps({"topic": "inferd/pi-1/cmd/feedback", "payload": {"bad": 1}})
        + "\n"
    )
    out = tmp_path / "ds"
    code = main(
        ["collect", "--replay", str(capture), "--since", "2025-05-01T12:00:00Z", "--out", str(out),
         "--format", "npz"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "2 prediction records, 2 labelled" in printed
    data = np.load(out / "clf.npz")
    assert data["request_id"].tolist() == ["new", "new2"]  # new2 was labelled over HTTP
    np.testing.assert_allclose(data["y"], [1.5, 0.5])


def test_cli_live_stops_after_count(broker, publisher, tmp_path, capsys) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "live"
    rows = cli_live(
        ["--broker", f"{broker.host}:{broker.port}"],
        publisher,
        prefix,
        out,
        duration_s=10,
        sends=200,
    )
    assert len(rows) >= 2


def cli_live(
    argv: list[str],
    publisher: Publisher,
    prefix: str,
    out: Path,
    duration_s: int = 20,
    sends: int = 500,
) -> list[str]:
    """Run ``inferctl collect ARGV --count 2`` in a thread, publishing (``sends`` batches at the
    most) until it ends; its rows."""
    argv = ["collect", *argv, "--prefix", prefix, "--count", "2", "--duration", str(duration_s)]
    result: list[int] = []
    cli = threading.Thread(
        target=lambda: result.append(main([*argv, "--out", str(out)])), name="test-collect-cli"
    )
    cli.start()
    i = 0
    while cli.is_alive() and i < sends:  # the CLI subscribes at some point; keep publishing
        publisher.send(f"{prefix}/pi-3/predictions", batch("pi-3", (f"r{i}", [[i, i]], i)))
        i += 1
        time.sleep(0.03)
    cli.join(10)
    assert result == [0]
    return (out / "dataset.jsonl").read_text().splitlines()


def test_cli_takes_the_next_node_when_the_first_is_down(broker_factory, tmp_path) -> None:
    down, up = broker_factory(), broker_factory()
    down.kill()
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    nodes = f"{down.host}:{down.port},{up.host}:{up.port}"
    publisher = Publisher(up.host, up.port)
    try:
        rows = cli_live(["--broker", nodes], publisher, prefix, tmp_path / "live")
    finally:
        publisher.close()
    assert len(rows) >= 2


def test_cli_speaks_311_to_a_broker_that_refuses_mqtt5(nats_node, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="telemetry.broker")
    node = nats_node.nodes[0]
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    publisher = Publisher(node.host, node.port, mqtt.MQTTv311)
    try:
        rows = cli_live(["--broker", node.where], publisher, prefix, tmp_path / "live")
    finally:
        publisher.close()
    assert len(rows) >= 2
    assert f"broker mqtt://{node.where} refused MQTT 5; trying 3.1.1" in caplog.text


def test_persistent_session_on_a_broker_that_refuses_mqtt5(nats_node, tmp_path) -> None:
    node = nats_node.nodes[0]
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    session = f"collect-{uuid.uuid4().hex[:8]}"
    publisher = Publisher(node.host, node.port, mqtt.MQTTv311)
    try:
        first = collect_live(node, prefix, lambda: None, session=session)
        assert not first.records
        # collect is not running now: a clean_session false session keeps its messages
        publisher.send(f"{prefix}/pi-2/predictions", batch("pi-2", ("q", [[0, 1]], 0)))
        second = collect_live(node, prefix, lambda: None, lambda c: c.records, session=session)
    finally:
        publisher.close()
    assert ("pi-2", "clf", "q") in second.records


def test_relative_since_and_bad_times() -> None:
    now = datetime(2025, 5, 2, tzinfo=timezone.utc)
    assert parse_time("12h", now) == now - timedelta(hours=12)
    assert parse_time("2025-05-01T00:00:00") == datetime(2025, 5, 1, tzinfo=timezone.utc)
    with pytest.raises(Exception, match="must be RFC 3339"):
        parse_time("yesterday")


def test_cli_needs_a_source(capsys, tmp_path) -> None:
    assert main(["collect", "--out", str(tmp_path)]) == 1
    assert "give --broker HOST:PORT to subscribe, or --replay FILE" in capsys.readouterr().err


def test_unreachable_broker_is_one_line(capsys, tmp_path) -> None:
    port = free_port()
    code = main(
        ["collect", "--broker", f"127.0.0.1:{port}", "--duration", "1", "--out", str(tmp_path)]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot connect to mqtt://127.0.0.1:{port}" in err
    assert "Traceback" not in err


def test_collect_from_a_real_daemon_closes_the_loop(broker, publisher, inferd_daemon, tmp_path):
    """inferd run logs tensors, labels go over cmd/feedback, collect writes a trainable npz."""
    demo = Path(__file__).resolve().parents[3] / "examples" / "models"
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    collector = Collector(prefix=prefix)
    ready, stop = threading.Event(), threading.Event()
    opts = BrokerOptions(host=broker.host, port=broker.port)
    worker = threading.Thread(
        target=subscribe,
        args=(collector, opts),
        kwargs={"ready": ready.set, "stop": stop, "duration_s": 20},
        name="test-collect",
    )
    worker.start()
    try:
        assert ready.wait(5)
        d = inferd_daemon(
            {
                "device_id": "pi-9",
                "mqtt": {"enabled": True, "host": broker.host, "port": broker.port,
                         "topic_prefix": prefix},
                "updates": {"enabled": False},
                "telemetry": {"prediction_batch_ms": 50},
                "models": [{"name": "classifier", "path": str(demo / "demo.onnx"),
                            "log_tensors": True}],
            }
        )  # fmt: skip
        x = np.load(demo / "demo.eval.npz")["x"][:5]
        y = np.load(demo / "demo.eval.npz")["y"][:5]
        for i, row in enumerate(x):
            status, _ = d.infer(
                "classifier",
                [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": row.tolist()}],
                id=f"e{i}",
            )
            assert status == 200
        items = [{"id": f"e{i}", "label": int(t)} for i, t in enumerate(y)]
        body = json.dumps({"model": "classifier", "items": items}).encode()
        publisher.send(f"{prefix}/pi-9/cmd/feedback", body)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            len(collector.records) < 5 or len(collector.labels) < 5
        ):
            time.sleep(0.02)
    finally:
        stop.set()
        worker.join(5)
    written = write(collector, tmp_path / "ds", "npz", labelled_only=True)
    assert written == {"classifier.npz": 5}
    data = np.load(tmp_path / "ds" / "classifier.npz")
    order = np.argsort(data["request_id"])
    np.testing.assert_array_equal(data["x"][order], x)
    np.testing.assert_array_equal(data["y"][order], y)
    assert set(data["device"]) == {"pi-9"}
