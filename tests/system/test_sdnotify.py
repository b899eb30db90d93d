"""sd_notify against a real AF_UNIX datagram socket: the protocol in-process, then the daemon.

The daemon tests run ``inferd run`` as a subprocess with ``NOTIFY_SOCKET`` (and
``WATCHDOG_USEC``) pointing at the test's socket, as systemd would.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.sdnotify import Notifier, WatchdogPinger, socket_address, watchdog_interval
from tests.support.broker import Broker, Capture
from tests.support.daemon import DaemonProc, start_daemon
from tests.support.net import free_port
from tests.support.sdnotify import NotifyListener

# ---------------------------------------------------------------- the protocol, in-process


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@inferd/notify") == b"\0inferd/notify"
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None


def test_abstract_namespace_socket_gets_ready_and_status() -> None:
    name = f"inferd-test-{uuid.uuid4().hex}"
    listener = NotifyListener(b"\0" + name.encode())
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        assert notifier.ready("serving demo v1\non 127.0.0.1:8080")
        _, msg = listener.wait_for("READY", timeout=5)
        # a newline inside the status would end the field: it is folded into one line
        assert msg["STATUS"] == "serving demo v1 on 127.0.0.1:8080"
    finally:
        listener.close()


def test_reloading_carries_the_monotonic_clock(notify_socket: tuple[str, NotifyListener]) -> None:
    path, listener = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    _, msg = listener.wait_for("RELOADING", timeout=5)
    assert before <= int(msg["MONOTONIC_USEC"]) <= after
    notifier.stopping()
    listener.wait_for("STOPPING", timeout=5)
    notifier.close()


def test_watchdog_interval_is_for_this_process_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None


def test_outside_systemd_nothing_is_sent_and_no_thread_starts() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert not notifier.ready("x")
    pinger = WatchdogPinger(notifier, lambda: None)
    pinger.start()
    assert "inferd-watchdog" not in {t.name for t in threading.enumerate()}
    pinger.stop()


def test_unreachable_socket_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, logger="agent.sdnotify"):
        for _ in range(5):
            assert not notifier.watchdog()
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1
    notifier.close()


def test_pinger_feeds_the_watchdog_only_while_healthy(
    notify_socket: tuple[str, NotifyListener],
) -> None:
    path, listener = notify_socket
    problem: list[str | None] = [None]
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    pinger = WatchdogPinger(notifier, lambda: problem[0], status=lambda: "serving m v1")
    assert pinger.interval_s == pytest.approx(0.05)
    pinger.start()
    try:
        deadline = time.monotonic() + 5
        while len(listener.times("WATCHDOG")) < 3:
            assert time.monotonic() < deadline, "no watchdog pings"
            time.sleep(0.01)
        listener.wait_for("STATUS", "serving m v1", timeout=5)

        problem[0] = "model m: a run has been going for 99 s"
        listener.wait_for("STATUS", "unhealthy: model m: a run has been going for 99 s", timeout=5)
        count = len(listener.times("WATCHDOG"))
        time.sleep(0.4)  # eight intervals
        assert len(listener.times("WATCHDOG")) == count

        problem[0] = None
        listener.wait_for("STATUS", "serving m v1", timeout=5, after=1)
        deadline = time.monotonic() + 5
        while len(listener.times("WATCHDOG")) == count:
            assert time.monotonic() < deadline, "pings did not resume"
            time.sleep(0.01)
    finally:
        pinger.stop()
        notifier.close()
    assert "inferd-watchdog" not in {t.name for t in threading.enumerate()}


def test_a_failing_health_check_counts_as_unhealthy(
    notify_socket: tuple[str, NotifyListener],
) -> None:
    path, listener = notify_socket

    def broken() -> str | None:
        raise RuntimeError("probe crashed")

    pinger = WatchdogPinger(Notifier({"NOTIFY_SOCKET": path}), broken, interval_s=1.0)
    assert not pinger.tick()
    listener.wait_for("STATUS", "unhealthy: health check failed: probe crashed", timeout=5)
    assert listener.times("WATCHDOG") == []


# ---------------------------------------------------------------- the daemon under "systemd"


def _spin_config(model: Path, **model_extra: Any) -> dict[str, Any]:
    return {"models": [{"name": "spin", "path": str(model), **model_extra}]}


def _start(
    tmp_path: Path, config: dict[str, Any], notify: str, watchdog_usec: int | None = None
) -> DaemonProc:
    env = {"NOTIFY_SOCKET": notify}
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return start_daemon(tmp_path, config, env, wait=False)


def _spin_request(n: int) -> dict[str, Any]:
    return {"inputs": [{"name": "n", "shape": [], "datatype": "INT64", "data": [n]}]}


def test_ready_only_after_models_load_and_api_answers(
    tmp_path: Path,
    notify_socket: tuple[str, NotifyListener],
    spin_model: Callable[[], Path],
) -> None:
    path, listener = notify_socket
    daemon = _start(tmp_path, _spin_config(spin_model()), path)
    try:
        index, ready = listener.wait_for("READY", timeout=30)
        # The moment READY arrives, the API must already answer and the model serve.
        assert daemon.request("GET", "/v2/health/ready")[0] == 200
        assert daemon.request("GET", "/v2/models/spin/ready")[0] == 200
        status, body = daemon.request("POST", "/v2/models/spin/infer", _spin_request(7))
        assert status == 200 and body["outputs"][0]["data"] == [7.0]
        assert ready["STATUS"] == f"serving spin v1 on 127.0.0.1:{daemon.port}"
        assert all("READY" not in m for _, m in listener.messages[:index])
        # No WATCHDOG_USEC given: no watchdog pings.
        time.sleep(0.3)
        assert listener.times("WATCHDOG") == []
    finally:
        assert daemon.stop() == 0, daemon.stderr()


def test_stopping_on_sigterm(
    tmp_path: Path,
    notify_socket: tuple[str, NotifyListener],
    spin_model: Callable[[], Path],
) -> None:
    path, listener = notify_socket
    daemon = _start(tmp_path, _spin_config(spin_model()), path, watchdog_usec=200_000)
    try:
        listener.wait_for("READY", timeout=30)
        listener.wait_for("WATCHDOG", timeout=5)
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.proc.wait(20)
    assert code == 0, daemon.stderr()
    index, _ = listener.wait_for("STOPPING", timeout=5)
    # The pinger stops before shutdown proceeds: no keep-alive after STOPPING=1.
    assert all("WATCHDOG" not in m for _, m in listener.messages[index + 1 :])


def test_watchdog_stops_when_the_backend_is_wedged(
    tmp_path: Path,
    notify_socket: tuple[str, NotifyListener],
    spin_model: Callable[[], Path],
) -> None:
    path, listener = notify_socket
    config = _spin_config(spin_model(), stuck_run_s=0.5)
    daemon = _start(tmp_path, config, path, watchdog_usec=400_000)  # a ping every 0.2 s
    replies: list[int] = []

    def wedge() -> None:
        conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=120)
        try:
            conn.request("POST", "/v2/models/spin/infer", json.dumps(_spin_request(10**10)))
            replies.append(conn.getresponse().status)
        except OSError:
            pass  # the daemon is killed mid-run
        finally:
            conn.close()

    wedger = threading.Thread(target=wedge, name="wedge-request")
    try:
        listener.wait_for("READY", timeout=30)
        deadline = time.monotonic() + 5
        while len(listener.times("WATCHDOG")) < 3:
            assert time.monotonic() < deadline, f"no pings while healthy: {daemon.stderr()}"
            time.sleep(0.02)
        # a short run keeps it healthy
        assert daemon.request("POST", "/v2/models/spin/infer", _spin_request(1000))[0] == 200

        wedger.start()
        _, msg = listener.wait_for("STATUS", "unhealthy: model spin", timeout=10, prefix=True)
        assert "a run has been going for" in msg["STATUS"]
        count = len(listener.times("WATCHDOG"))
        time.sleep(1.2)  # six ping intervals, more than the 0.4 s WatchdogSec
        assert len(listener.times("WATCHDOG")) == count, "pings went on with a wedged backend"
        # The API itself still answers: it is the stuck run that starves the watchdog.
        assert daemon.request("GET", "/v2/health/live")[0] == 200
        assert "not feeding the systemd watchdog" in daemon.stderr()
    finally:
        daemon.proc.kill()  # what systemd does when the watchdog fires
        daemon.proc.wait(20)
        if wedger.is_alive() or wedger.ident is not None:
            wedger.join(20)
    assert replies == []


def test_sighup_reloads_live_keys_and_reports_the_rest(
    tmp_path: Path,
    notify_socket: tuple[str, NotifyListener],
    spin_model: Callable[[], Path],
) -> None:
    path, listener = notify_socket
    daemon = _start(tmp_path, _spin_config(spin_model()), path)
    try:
        listener.wait_for("READY", timeout=30)
        changed = json.loads(json.dumps(daemon.config))
        changed["log_level"] = "debug"
        changed["telemetry"] = {"prediction_sample_rate": 0.25, "metrics_interval_s": 2}
        changed["api"]["listen"] = f"127.0.0.1:{free_port()}"
        changed["models"][0]["threads"] = 2
        daemon.config_path.write_text(yaml.safe_dump(changed))

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.proc.send_signal(signal.SIGHUP)
        index, reloading = listener.wait_for("RELOADING", timeout=10)
        assert before <= int(reloading["MONOTONIC_USEC"]) <= before + 10_000_000
        _, ready = listener.wait_for("READY", timeout=10, after=index + 1)
        assert ready["STATUS"] == (
            f"serving spin v1 on 127.0.0.1:{daemon.port}; "
            "restart to apply api.listen, models[0].threads"
        )
        log = daemon.stderr()
        assert "config reloaded: log_level, telemetry.metrics_interval_s" in log
        assert "take effect only after a restart" in log and "api.listen" in log
        # still serving where it was: api.listen is not changed live
        assert daemon.request("GET", "/v2/health/ready")[0] == 200

        changed["models"][0]["threads"] = -1
        daemon.config_path.write_text(yaml.safe_dump(changed))
        daemon.proc.send_signal(signal.SIGHUP)
        index, _ = listener.wait_for("RELOADING", timeout=10, after=index + 1)
        _, ready = listener.wait_for("READY", timeout=10, after=index + 1)
        assert ready["STATUS"].endswith("; last reload failed")
        assert "config reload failed" in daemon.stderr()
        assert daemon.request("GET", "/v2/health/ready")[0] == 200
    finally:
        assert daemon.stop() == 0, daemon.stderr()


def test_api_probe_sees_a_dead_listener() -> None:
    from agent.health import probe_api

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    problem = probe_api(("127.0.0.1", port), timeout=1.0)
    assert problem is not None and problem.startswith("API does not answer")


def test_sighup_changes_the_metrics_interval_of_the_running_telemetry(
    tmp_path: Path,
    notify_socket: tuple[str, NotifyListener],
    spin_model: Callable[[], Path],
    broker: Broker,
    capture_factory: Callable[..., Capture],
) -> None:
    """A live key reaches the real telemetry component: metrics speed up without a restart,
    and Home Assistant hears the new interval (its sensors' ``expire_after``)."""
    path, listener = notify_socket
    config = _spin_config(spin_model())
    config["mqtt"] = {
        "enabled": True,
        "host": broker.host,
        "port": broker.port,
        "homeassistant_discovery": True,
    }
    # Long: the new interval must cut the wait under way short, not take effect after it.
    config["telemetry"] = {"metrics_interval_s": 300.0}
    config["updates"] = {"enabled": False}
    capture = capture_factory(broker, "inferd/test-device/#")
    discovery = capture_factory(broker, "homeassistant/#")

    def metrics_expire_after() -> set[int]:
        """expire_after of the metrics sensors, from the last config heard of each."""
        configs = [json.loads(m.payload) for m in discovery.on("/config") if m.payload]
        last = {c["unique_id"]: c for c in configs if c["state_topic"].endswith("/metrics")}
        return {c["expire_after"] for c in last.values()}

    daemon = _start(tmp_path, config, path)
    try:
        listener.wait_for("READY", timeout=30)
        assert capture.wait(lambda: capture.on("/status") != [], 10), daemon.stderr()
        assert discovery.wait(lambda: metrics_expire_after() == {900}, 10)  # 3 x 300 s
        before = len(capture.on("/metrics"))

        config = json.loads(json.dumps(daemon.config))
        config["telemetry"]["metrics_interval_s"] = 0.1
        daemon.config_path.write_text(yaml.safe_dump(config))
        daemon.proc.send_signal(signal.SIGHUP)
        index, _ = listener.wait_for("RELOADING", timeout=10)
        _, ready = listener.wait_for("READY", timeout=10, after=index + 1)
        assert "restart to apply" not in ready["STATUS"]
        # 10 more within 4 s: at the old 300 s interval there would be none
        assert capture.wait(lambda: len(capture.on("/metrics")) >= before + 10, 4), (
            "metrics did not speed up after the reload"
        )
        assert capture.wait(
            lambda: any(b"config-reloaded" in m.payload for m in capture.on("/events")), 10
        )
        # three intervals of 0.1 s, rounded up to HA's whole seconds
        assert discovery.wait(lambda: metrics_expire_after() == {1}, 10), metrics_expire_after()
    finally:
        assert daemon.stop() == 0, daemon.stderr()
