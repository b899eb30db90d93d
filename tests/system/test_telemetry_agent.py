"""Telemetry of a real ``inferd run`` process against a private mosquitto.

Broker and agent outages, the last will on SIGKILL, refused credentials and bad TLS files,
MQTT request/response inference, the ``set-sampling`` command and what ``metrics_qos`` means
through an outage (the telemetry component in this process).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.reporting import Telemetry
from tests.support.broker import Broker, Capture, Cutter
from tests.support.daemon import DaemonProc, start_daemon
from tests.support.mqtt_agent import DEVICE, agent_config, infer, request


def records(c: Capture) -> list[str]:
    out = []
    for m in c.on("/predictions"):
        out += [r["request_id"] for r in json.loads(m.payload)["records"]]
    return out


def kinds(c: Capture) -> list[str]:
    return [json.loads(m.payload)["kind"] for m in c.on("/events")]


def restart(b: Broker, cap: Capture, gate: Cutter) -> None:
    """Start the broker again and let the agent in only once the capture is back.

    (mosquitto does not queue for a restored session until its client reconnects.)
    """
    gate.cut()
    before = cap.subscribed
    b.start()
    assert cap.back(before)
    gate.restore()


def test_predictions_and_events_survive_broker_kill_and_agent_restart(
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    capture_factory: Callable[..., Capture],
    cutter_factory: Callable[..., Cutter],
    model_factory: Callable[..., Path],
) -> None:
    b = broker_factory(persist=True)
    cap = capture_factory(b, f"inferd/{DEVICE}/predictions", f"inferd/{DEVICE}/events")
    b.save()  # the capture's subscription outlives the broker kills below
    gate = cutter_factory(b)
    cfg = agent_config(model_factory("classifier"), gate, tmp_path / "state")
    first = tmp_path / "run1"
    first.mkdir()
    d = start_daemon(first, cfg)
    sent: list[str] = []
    try:
        for i in range(60):
            sent.append(f"a{i}")
            infer(d, sent[-1])
        # let the broker hand over what it acknowledged before it dies (see test_mqtt_link)
        assert cap.wait(lambda: len(set(records(cap))) == 60, 10)
        b.kill()
        for i in range(150):  # the broker is gone: predictions and events spool
            sent.append(f"b{i}")
            infer(d, sent[-1])
        restart(b, cap, gate)
        assert cap.wait(lambda: set(records(cap)) >= set(sent), 15), (
            sorted(set(sent) - set(records(cap))),
            d.stderr(),
        )
        b.kill()
        for i in range(80):
            sent.append(f"c{i}")
            infer(d, sent[-1])
    finally:
        assert d.stop() == 0, d.stderr()  # stops while the broker is down: all stays spooled
    restart(b, cap, gate)
    second = tmp_path / "run2"
    second.mkdir()
    d2 = start_daemon(second, cfg)  # same state_dir: the spool replays
    try:
        for i in range(20):
            sent.append(f"d{i}")
            infer(d2, sent[-1])
        assert cap.wait(lambda: set(records(cap)) >= set(sent), 15), d2.stderr()
        assert cap.wait(lambda: kinds(cap).count("agent-started") == 2, 10)
    finally:
        assert d2.stop() == 0
    first_seen = list(dict.fromkeys(records(cap)))  # QoS 1: a batch in flight may repeat
    assert first_seen == sent
    ev = list(dict.fromkeys(kinds(cap)))
    assert ev[:2] == ["agent-started", "agent-stopping"] and ev.count("agent-started") == 1
    assert kinds(cap).index("agent-stopping") < len(kinds(cap)) - 1


def test_last_will_on_sigkill_and_status_back_after_restart(
    tmp_path: Path,
    broker: Broker,
    capture_factory: Callable[..., Capture],
    model_factory: Callable[..., Path],
) -> None:
    cap = capture_factory(broker, f"inferd/{DEVICE}/status")
    cfg = agent_config(model_factory("classifier"), broker, tmp_path / "state")

    def states() -> list[str]:
        return [json.loads(m.payload)["state"] for m in cap.on("/status")]

    run1 = tmp_path / "run1"
    run1.mkdir()
    d = start_daemon(run1, cfg)
    assert cap.wait(lambda: states()[-1:] == ["online"], 10)
    online = json.loads(cap.on("/status")[-1].payload)
    assert online["models"][0]["name"] == "clf" and online["models"][0]["ready"] is True
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert cap.wait(lambda: states()[-1:] == ["offline"], 10)
    will = json.loads(cap.on("/status")[-1].payload)
    assert will["reason"] == "connection-lost" and will["ts"] is None
    run2 = tmp_path / "run2"
    run2.mkdir()
    d2 = start_daemon(run2, cfg)
    try:
        assert cap.wait(lambda: states()[-1:] == ["online"], 10)
    finally:
        assert d2.stop() == 0
    assert cap.wait(lambda: json.loads(cap.on("/status")[-1].payload).get("reason") == "shutdown")


def mqtt_error_lines(d: DaemonProc) -> list[str]:
    return [line for line in d.stderr().splitlines() if "ERROR" in line and "mqtt" in line]


def test_wrong_password_is_one_error_line_and_inference_goes_on(
    tmp_path: Path, broker_factory: Callable[..., Broker], model_factory: Callable[..., Path]
) -> None:
    pwfile = tmp_path / "passwd"
    pwfile.write_text(f"{DEVICE}:right\n")
    subprocess.run(["mosquitto_passwd", "-U", str(pwfile)], check=True)
    b = broker_factory(f"allow_anonymous false\npassword_file {pwfile}\n")
    secret = tmp_path / "mqtt.pw"
    secret.write_text("not-the-password\n")
    cfg = agent_config(
        model_factory("classifier"),
        b,
        tmp_path / "state",
        username=DEVICE,
        password_file=str(secret),
    )
    run = tmp_path / "run"
    run.mkdir()
    d = start_daemon(run, cfg)
    try:
        for i in range(20):
            infer(d, f"r{i}")
        time.sleep(1.5)  # several reconnect periods
        infer(d, "still-serving")
    finally:
        assert d.stop() == 0
    lines = mqtt_error_lines(d)
    assert len(lines) == 1, d.stderr()
    assert "refused" in lines[0] and "password" in lines[0]
    assert "not-the-password" not in d.stderr()


def test_bad_tls_file_is_one_error_line_and_inference_goes_on(
    tmp_path: Path, broker: Broker, model_factory: Callable[..., Path]
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    cfg = agent_config(
        model_factory("classifier"), broker, tmp_path / "state", tls={"ca_file": str(ca)}
    )
    run = tmp_path / "run"
    run.mkdir()
    d = start_daemon(run, cfg)
    try:
        time.sleep(1.0)
        infer(d, "serving")
    finally:
        assert d.stop() == 0
    lines = mqtt_error_lines(d)
    assert len(lines) == 1, d.stderr()
    assert "mqtt.tls.ca_file" in lines[0] and str(ca) in lines[0]


@pytest.fixture
def live_agent(
    tmp_path: Path,
    broker: Broker,
    capture_factory: Callable[..., Capture],
    model_factory: Callable[..., Path],
) -> Any:
    cap = capture_factory(broker, "replies/#", f"inferd/{DEVICE}/#")
    cfg = agent_config(model_factory("classifier"), broker, tmp_path / "state")
    run = tmp_path / "run"
    run.mkdir()
    d = start_daemon(run, cfg)
    assert cap.wait(lambda: bool(cap.on("/status")), 10)
    yield d, cap
    assert d.stop() == 0, d.stderr()


def replies(cap: Capture, corr: bytes) -> list[Any]:
    return [m for m in cap.on("replies/x") if m.properties.CorrelationData == corr]


def test_mqtt_inference_answers_every_request(live_agent: Any) -> None:
    _d, cap = live_agent
    good = {"id": "q1", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                    "data": [0.1] * 4}]}  # fmt: skip
    request(cap, f"inferd/{DEVICE}/infer/clf", json.dumps(good).encode(), b"c1")
    assert cap.wait(lambda: bool(replies(cap, b"c1")), 10)
    ok = replies(cap, b"c1")[0]
    body = json.loads(ok.payload)
    assert body["id"] == "q1" and body["outputs"][0]["shape"] == [1, 3]
    assert ("status", "200") in ok.properties.UserProperty
    bad_shape = {"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [0] * 5}]}
    cases = [
        (f"inferd/{DEVICE}/infer/clf", json.dumps(bad_shape).encode(), b"c2", "400", "shape"),
        (f"inferd/{DEVICE}/infer/clf", b"{nope", b"c3", "400", "JSON"),
        (f"inferd/{DEVICE}/infer/nosuch", json.dumps(good).encode(), b"c4", "404", "nosuch"),
    ]
    for topic, payload, corr, _, _ in cases:
        request(cap, topic, payload, corr)
    for _, _, corr, status, words in cases:
        assert cap.wait(lambda c=corr: bool(replies(cap, c)), 10), corr  # type: ignore[misc]
        reply = replies(cap, corr)[0]
        assert ("status", status) in reply.properties.UserProperty
        assert words in json.loads(reply.payload)["error"]
    # a client without MQTT 5 properties gets its answer on {topic}/reply, matched by id
    cap.client.publish(f"inferd/{DEVICE}/infer/clf", json.dumps(good).encode(), qos=1)
    assert cap.wait(lambda: bool(cap.on("/infer/clf/reply")), 10)
    assert json.loads(cap.on("/infer/clf/reply")[0].payload)["id"] == "q1"


def test_set_sampling_command_stops_and_restarts_the_prediction_log(live_agent: Any) -> None:
    d, cap = live_agent
    request(cap, f"inferd/{DEVICE}/cmd/set-sampling", b'{"rate": 0}', b"s1")
    assert cap.wait(lambda: bool(replies(cap, b"s1")), 10)
    assert json.loads(replies(cap, b"s1")[0].payload)["ok"] is True
    for i in range(10):
        infer(d, f"unsampled{i}")
    request(cap, f"inferd/{DEVICE}/cmd/set-sampling", b'{"rate": 1, "model": "clf"}', b"s2")
    assert cap.wait(lambda: bool(replies(cap, b"s2")), 10)
    for i in range(5):
        infer(d, f"sampled{i}")
    assert cap.wait(lambda: len(records(cap)) >= 5, 10)
    time.sleep(0.3)
    assert records(cap) == [f"sampled{i}" for i in range(5)]
    request(cap, f"inferd/{DEVICE}/cmd/set-sampling", b'{"rate": 7}', b"s3")
    assert cap.wait(lambda: bool(replies(cap, b"s3")), 10)
    assert "rate" in json.loads(replies(cap, b"s3")[0].payload)["error"]


def _built_at(m: Any) -> float:
    ts = json.loads(m.payload)["ts"].replace("Z", "+00:00")
    return datetime.fromisoformat(ts).timestamp()


@pytest.mark.parametrize("qos", [0, 1])
def test_metrics_qos_decides_whether_metrics_from_an_outage_arrive(
    qos: int,
    tmp_path: Path,
    broker: Broker,
    capture_factory: Callable[..., Capture],
    cutter_factory: Callable[..., Cutter],
) -> None:
    """QoS 1 metrics are spooled and replayed after an outage; QoS 0 ones are sent unspooled
    and those built while the broker was away never arrive (no stale burst on reconnect)."""
    cap = capture_factory(broker, "inferd/qos-dev/metrics")
    gate = cutter_factory(broker)
    config = parse_config(
        {
            "device_id": "qos-dev",
            "state_dir": str(tmp_path / "state"),
            "mqtt": {"host": gate.host, "port": gate.port, "reconnect_min_s": 0.05,
                     "reconnect_max_s": 0.2},
            "telemetry": {"metrics_interval_s": 0.05, "metrics_qos": qos},
        },
        environ={},
    )  # fmt: skip
    telemetry = Telemetry(config, {})
    telemetry.start()
    try:
        assert cap.wait(lambda: len(cap.on("/metrics")) >= 3, 10)
        assert {m.qos for m in cap.on("/metrics")} == {qos}
        gate.cut()
        down = time.time()
        time.sleep(0.6)  # about 12 intervals without a broker
        back = time.time()
        gate.restore()
        assert cap.wait(lambda: any(_built_at(m) > back for m in cap.on("/metrics")), 10)
        assert telemetry.link.flush(10)
    finally:
        telemetry.stop()
    during = [m for m in cap.on("/metrics") if down + 0.1 < _built_at(m) < back]
    if qos == 1:
        assert len(during) >= 5
    else:
        assert during == []
