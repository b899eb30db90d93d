"""The MQTT link against a real mosquitto: birth, will, events, commands, outages, bad logins."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt import link as link_module
from agent.mqtt.link import SPOOL_FILE, Command, MqttLink, backoff_delay
from runtime.errors import InferdError
from tests.support.broker import Broker, Capture
from tests.support.links import link_config
from tests.support.spool import corrupt_pages, spool_with_a_big_row
from tests.support.waits import wait_until


def decoded(c: Capture, suffix: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in c.on(suffix)]


def test_birth_status_is_retained_and_clean_stop_publishes_offline(
    tmp_path: Path, broker: Broker, make_link: Callable[..., MqttLink], capture_factory: Any
) -> None:
    link = make_link(link_config(tmp_path, broker))
    assert wait_until(lambda: link.connected)
    assert link.flush(5)
    late = capture_factory(
        broker, "inferd/+/status"
    )  # joins after the birth: gets the retained one
    assert late.wait(lambda: bool(late.on("status")))
    first = late.on("status")[0]
    assert first.retain and json.loads(first.payload)["state"] == "online"
    link.stop(timeout=2)
    assert late.wait(lambda: decoded(late, "status")[-1]["state"] == "offline")
    assert decoded(late, "status")[-1]["reason"] == "shutdown"


def test_events_are_durable_and_ordered_across_a_broker_kill(
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    make_link: Callable[..., MqttLink],
    capture_factory: Any,
    cutter_factory: Any,
) -> None:
    b = broker_factory(persist=True)
    cap = capture_factory(b, "inferd/dev1/events")
    b.save()  # the capture's session survives the kill below
    gate = cutter_factory(b)
    link = make_link(link_config(tmp_path, gate))
    assert wait_until(lambda: link.connected)
    for i in range(50):
        link.emit_event("tick", f"n{i}", n=i)
    # Let the broker hand over what it acknowledged: mosquitto keeps undelivered messages in
    # memory, and a SIGKILL losing those is the broker's loss, not the agent's (the network
    # cut test below covers messages in flight from the agent).
    assert link.flush(5) and cap.wait(lambda: len(cap.on("events")) >= 50)
    b.kill()
    assert wait_until(lambda: not link.connected)
    for i in range(50, 150):
        link.emit_event("tick", f"n{i}", n=i)
    assert link.spool.pending >= 100
    # mosquitto queues for a restored session only once its client is back: let the link in
    # after the capture
    gate.cut()
    before = cap.subscribed
    b.start()
    assert cap.back(before)
    gate.restore()
    assert link.flush(15), f"{link.spool.pending} still spooled"

    def numbers() -> list[int]:
        return [e["details"]["n"] for e in decoded(cap, "events")]

    assert cap.wait(lambda: set(numbers()) >= set(range(150))), str(
        sorted(set(range(150)) - set(numbers()))
    )
    seen: list[int] = []
    for e in decoded(cap, "events"):
        if e["details"]["n"] not in seen:  # QoS 1: a message in flight at the kill may repeat
            seen.append(e["details"]["n"])
    assert seen == list(range(150))
    assert link.connects == 2


def test_nothing_is_lost_when_the_network_drops_mid_stream(
    tmp_path: Path,
    broker: Broker,
    cutter_factory: Any,
    make_link: Callable[..., MqttLink],
    capture_factory: Any,
) -> None:
    cap = capture_factory(broker, "inferd/dev1/events", "inferd/dev1/predictions")
    cutter = cutter_factory(broker)
    link = make_link(link_config(tmp_path, cutter))
    assert wait_until(lambda: link.connected)
    stop = threading.Event()
    produced: list[str] = []

    def produce() -> None:
        n = 0
        while not stop.is_set():
            if n % 10 == 0:
                link.emit_event("tick", str(n), n=n)
            else:
                link.publish("predictions", json.dumps({"n": n}).encode(), records=1)
            produced.append(str(n))
            n += 1
            time.sleep(0.0005)

    producer = threading.Thread(target=produce, name="test-producer")
    producer.start()
    try:
        assert cap.wait(lambda: len(cap.messages) > 300)
        cutter.cut()  # mid-stream: messages in flight lose their acks
        assert wait_until(lambda: not link.connected)
        time.sleep(0.3)
        cutter.restore()
        assert wait_until(lambda: link.connects == 2)
        time.sleep(0.2)
    finally:
        stop.set()
        producer.join()
    assert link.flush(10)

    def numbers() -> list[str]:
        out = []
        for m in list(cap.messages):
            body = json.loads(m.payload)
            out.append(str(body["details"]["n"]) if "events" in m.topic else str(body["n"]))
        return out

    assert cap.wait(lambda: set(numbers()) >= set(produced), 10)
    first_seen = list(dict.fromkeys(numbers()))  # QoS 1: a message in flight may repeat
    assert first_seen == produced
    assert link.spool.dropped_records == 0


def test_status_comes_first_after_reconnect_and_subscriptions_are_restored(
    tmp_path: Path,
    broker: Broker,
    make_link: Callable[..., MqttLink],
    capture_factory: Any,
    cutter_factory: Any,
) -> None:
    gate = cutter_factory(broker)
    link = make_link(link_config(tmp_path, gate))
    got: list[str] = []
    link.subscribe("inferd/dev1/hello", lambda m: got.append(m.payload.decode()))
    assert wait_until(lambda: link.connected)
    broker.kill()
    assert wait_until(lambda: not link.connected)
    for i in range(20):
        link.emit_event("queued", str(i))
    gate.cut()  # the link comes back only once the capture below listens
    broker.start()
    cap = capture_factory(broker, "inferd/dev1/#")
    gate.restore()
    assert cap.wait(lambda: len(cap.on("events")) == 20 and bool(cap.on("status")), 10)
    topics = [m.topic.rsplit("/", 1)[1] for m in cap.messages]
    assert topics.index("status") < topics.index("events")
    assert wait_until(lambda: link.connects == 2)
    cap.client.publish("inferd/dev1/hello", b"again", qos=1)
    assert wait_until(lambda: got == ["again"])


def test_commands_dispatch_reply_and_refuse(
    tmp_path: Path, broker: Broker, make_link: Callable[..., MqttLink], capture_factory: Any
) -> None:
    link = make_link(link_config(tmp_path, broker))
    calls: list[Command] = []

    def set_rate(cmd: Command) -> dict[str, Any]:
        if cmd.args.get("rate") == "bad":
            raise InferdError("rate must be a number")
        calls.append(cmd)
        return {"rate": cmd.args["rate"]}

    link.on_command("set-rate", set_rate)
    with pytest.raises(ValueError, match="already"):
        link.on_command("set-rate", set_rate)
    assert wait_until(lambda: link.connected)
    cap = capture_factory(broker, "replies/#", "inferd/dev1/events")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "replies/me"
    props.CorrelationData = b"c-1"
    cap.client.publish("inferd/dev1/cmd/set-rate", b'{"rate": 0.5}', qos=1, properties=props)
    assert cap.wait(lambda: bool(cap.on("replies/me")))
    reply = cap.on("replies/me")[0]
    assert json.loads(reply.payload)["ok"] is True
    assert json.loads(reply.payload)["result"] == {"rate": 0.5}
    assert reply.properties.CorrelationData == b"c-1"
    # a group command reaches the same handler, marked with its group
    cap.client.publish("inferd/groups/kitchen/set-rate", b'{"rate": 0.25}', qos=1)
    assert wait_until(lambda: len(calls) == 2)
    assert calls[1].group == "kitchen" and calls[0].group is None
    # refused, unknown and malformed commands answer and leave an event, never silence
    for body, topic in (
        (b'{"rate": "bad"}', "inferd/dev1/cmd/set-rate"),
        (b"{}", "inferd/dev1/cmd/nope"),
        (b"{not json", "inferd/dev1/cmd/set-rate"),
    ):
        cap.client.publish(topic, body, qos=1, properties=props)
    assert cap.wait(lambda: len(cap.on("replies/me")) == 4)
    errors = [json.loads(m.payload)["error"] for m in cap.on("replies/me")[1:]]
    assert errors[0] == "rate must be a number"
    assert "unknown command 'nope'" in errors[1]
    assert "invalid JSON" in errors[2]
    assert cap.wait(lambda: len(cap.on("events")) == 3)
    assert {json.loads(m.payload)["kind"] for m in cap.on("events")} == {"command-failed"}


def test_wrong_password_is_one_error_line_and_spooling_goes_on(
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    make_link: Callable[..., MqttLink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pwfile = tmp_path / "passwd"
    pwfile.write_text("dev1:secret\n")
    subprocess.run(["mosquitto_passwd", "-U", str(pwfile)], check=True)
    b = broker_factory(f"allow_anonymous false\npassword_file {pwfile}\n")
    caplog.set_level(logging.INFO, logger="agent.mqtt.link")
    link = make_link(link_config(tmp_path, b, username="dev1", password="wrong"))
    time.sleep(1.0)  # several retry periods at reconnect_max_s
    link.emit_event("still", "spooling")
    assert not link.connected and link.connects == 0 and link.spool.pending == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert "refused" in line and "password" in line and "wrong" not in line
    assert "\n" not in line


def test_bad_tls_file_is_one_error_line(
    tmp_path: Path,
    broker: Broker,
    make_link: Callable[..., MqttLink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    caplog.set_level(logging.INFO, logger="agent.mqtt.link")
    link = make_link(link_config(tmp_path, broker, tls={"ca_file": str(bad)}))
    time.sleep(0.8)
    link.emit_event("still", "spooling")
    assert not link.connected and link.spool.pending == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith("mqtt: mqtt.tls.ca_file: cannot load") and str(bad) in errors[0]


def test_backoff_is_jittered_exponential_and_bounded() -> None:
    delays = [backoff_delay(n, 1.0, 60.0) for n in range(12) for _ in range(20)]
    assert min(delays) >= 1.0 and max(delays) <= 60.0
    early = [backoff_delay(2, 1.0, 60.0) for _ in range(200)]
    assert max(early) <= 4.0 and len({round(d, 3) for d in early}) > 100
    assert max(backoff_delay(10, 1.0, 60.0) for _ in range(200)) > 30


def test_protocol_311_works(
    tmp_path: Path, broker: Broker, make_link: Callable[..., MqttLink], capture_factory: Any
) -> None:
    cap = capture_factory(broker, "inferd/dev1/#")
    link = make_link(link_config(tmp_path, broker, protocol="3.1.1"))
    link.emit_event("hello", "v3")
    assert link.flush(5)
    assert cap.wait(lambda: bool(cap.on("events")) and bool(cap.on("status")))
    assert msgspec.json.decode(cap.on("events")[0].payload)["message"] == "v3"


def test_spool_survives_a_restart_of_the_link(
    tmp_path: Path, broker: Broker, make_link: Callable[..., MqttLink], capture_factory: Any
) -> None:
    cfg = link_config(tmp_path, broker)
    broker.kill()
    first = make_link(cfg)
    for i in range(30):
        first.emit_event("offline", str(i))
    first.stop()
    broker.start()
    cap = capture_factory(broker, "inferd/dev1/events")
    second = make_link(cfg)
    assert second.flush(10)
    assert cap.wait(lambda: len(cap.on("events")) == 30)
    assert [json.loads(m.payload)["message"] for m in cap.on("events")] == [
        str(i) for i in range(30)
    ]


def test_a_dead_forwarder_is_restarted_and_the_link_is_not_healthy_until_then(
    tmp_path: Path,
    broker: Broker,
    make_link: Callable[..., MqttLink],
    capture_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cap = capture_factory(broker, "inferd/dev1/events")
    link = make_link(link_config(tmp_path, broker))
    assert wait_until(lambda: link.connected) and link.problem() is None
    real_read = link.spool.read
    failures = iter([RuntimeError("a fault no handler expects")])

    def faulty_read(after: int, limit: int) -> list[Any]:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real_read(after, limit)

    monkeypatch.setattr(link.spool, "read", faulty_read)  # a fault, not a stand-in for the spool
    link.emit_event("tick", "before the crash")
    problems = []
    deadline = time.monotonic() + 10
    while link.forwarder_restarts == 0 and time.monotonic() < deadline:
        problems.append(link.problem())
        time.sleep(0.01)
    assert link.forwarder_restarts == 1
    assert any(p and "forwarder failed" in p for p in problems), problems
    assert link.problem() is None
    link.emit_event("tick", "after the restart")
    kinds = lambda: [(e["kind"], e["message"]) for e in decoded(cap, "events")]  # noqa: E731
    assert cap.wait(lambda: ("tick", "after the restart") in kinds())
    assert ("tick", "before the crash") in kinds()  # nothing lost
    assert "mqtt-forwarder-restarted" in [k for k, _ in kinds()]


def test_a_corrupt_spool_row_stops_telemetry_only_until_the_spool_is_replaced(
    tmp_path: Path, broker: Broker, make_link: Callable[..., MqttLink], capture_factory: Any
) -> None:
    cfg = link_config(tmp_path, broker)
    path = Path(cfg.state_dir) / SPOOL_FILE
    spool_with_a_big_row(path)
    corrupt_pages(path, 8, 10)  # garbage over pages of the SQLite file
    cap = capture_factory(broker, "inferd/dev1/events")
    link = make_link(cfg)
    assert wait_until(lambda: link.connected)
    assert wait_until(lambda: link.spool.resets == 1, 15), "the bad row still blocks the spool"
    link.emit_event("tick", "flows again")
    kinds = lambda: [e["kind"] for e in decoded(cap, "events")]  # noqa: E731
    assert cap.wait(lambda: "tick" in kinds() and "spool-reset" in kinds())
    assert list(path.parent.glob(f"{SPOOL_FILE}.corrupt-*"))
    link.stop(timeout=2)
    again = make_link(cfg)  # after a restart nothing of the bad row is left to block on
    assert wait_until(lambda: again.connected)
    again.emit_event("tick", "after restart")
    assert cap.wait(lambda: kinds().count("tick") == 2)
    assert again.spool.resets == 0


def test_a_reply_returns_once_the_broker_has_it(
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    make_link: Callable[..., MqttLink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """paho keeps what it has not sent in memory without a bound: MQTT inference replies of
    megabytes made faster than the connection drained them held hundreds of megabytes. A reply
    returns once the broker acknowledged it, so the requests wait in their bounded queue."""
    monkeypatch.setattr(link_module, "REPLY_WAIT_S", 1.0)
    b = broker_factory()
    link = make_link(link_config(tmp_path, b))
    assert wait_until(lambda: link.connected)
    started = time.monotonic()
    assert link.send_reply("replies/app/1", b"x" * 100_000)
    answered = time.monotonic() - started
    assert b.proc is not None
    os.kill(b.proc.pid, signal.SIGSTOP)  # up, connected, and not acknowledging
    try:
        started = time.monotonic()
        assert link.send_reply("replies/app/2", b"x" * 100_000)
        held = time.monotonic() - started
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    assert answered < 0.5 and held >= 0.95, (answered, held)
