"""Each model slot has its own update job: a push for one slot is served within the usual 2 s
while another slot of the same ``inferd run`` sits in a 60 s trial (issue 12: one device-wide
job made slot B's update wait for slot A's whole trial window), and after a kill -9 each slot
resumes its own job."""

from __future__ import annotations

import json
import signal
import time
import uuid

from tests.support.broker import Broker, EventListener
from tests.support.daemon import DaemonProc, start_daemon
from tests.support.models import classifier
from updater.inferctl.main import main as inferctl

PUSH_TO_SERVING_S = 2.0
"""DESIGN section 9: push to serving new version (small model, localhost), per slot."""


def _serving(daemon: DaemonProc, model: str) -> str:
    status, body = daemon.request("GET", f"/v2/models/{model}")
    assert status == 200, body
    return str(body["versions"][0])


def _push_and_time(daemon: DaemonProc, broker: Broker, prefix: str, model: str) -> float:
    """Seconds from ``inferctl push`` to ``GET /v2/models/{model}`` naming version 2."""
    where = f"{broker.host}:{broker.port}"
    start = time.monotonic()
    assert inferctl(["push", "--group", "kitchen", "--prefix", prefix, "--broker", where]) == 0
    while _serving(daemon, model) != "2":
        assert time.monotonic() - start < 30, f"{model} not updated:\n{daemon.stderr()}"
        time.sleep(0.01)
    return time.monotonic() - start


def test_push_for_one_slot_is_served_while_another_slot_is_in_a_long_trial(
    broker: Broker, tuf_repo, tmp_path
):
    prefix = f"inferd-test-{uuid.uuid4().hex[:8]}"
    events = EventListener(broker, prefix)
    v1 = classifier(tmp_path / "v1.onnx")
    config = {
        "groups": ["kitchen"],
        "models": [{"name": "a", "path": str(v1)}, {"name": "b", "path": str(v1)}],
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "topic_prefix": prefix},
        "updates": {
            "repository_url": tuf_repo.url,
            "trusted_root": str(tuf_repo.trusted_root),
            "poll_interval_s": 3600,
            "check_on_start": False,
            "trial_window_s": 60,
            "trial_min_requests": 1000,  # no traffic: the trial just runs its window
            "validation_runs": 5,
        },
    }
    (tmp_path / "d").mkdir()
    daemon = start_daemon(tmp_path / "d", config)
    try:
        tuf_repo.publish(classifier(tmp_path / "a2.onnx", seed=2), "2", name="a")
        _push_and_time(daemon, broker, prefix, "a")
        deadline = time.monotonic() + 10
        while "trial" not in events.states("a"):
            assert time.monotonic() < deadline, events.events
            time.sleep(0.02)
        trial_started = time.monotonic()

        tuf_repo.publish(classifier(tmp_path / "b2.onnx", seed=3), "2", name="b")
        assert _serving(daemon, "b") == "1"
        took = _push_and_time(daemon, broker, prefix, "b")
        assert took <= PUSH_TO_SERVING_S, f"b took {took:.2f} s behind a's trial"
        assert time.monotonic() - trial_started < 60
        assert events.states("a")[-1] == "trial", "a is still in its trial"
        assert "committed" not in events.states("a")
        assert _serving(daemon, "a") == "2"
        # each slot's own job file says where it is, for a restart to resume
        jobs = daemon.state_dir / "update" / "jobs"
        deadline = time.monotonic() + 10
        while "trial" not in events.states("b"):  # saved before the event is sent
            assert time.monotonic() < deadline, events.events
            time.sleep(0.02)
        saved = {n: json.loads((jobs / f"{n}.json").read_bytes())["state"] for n in "ab"}
        assert saved == {"a": "trial", "b": "trial"}

        # kill -9 with both slots in trial: each resumes its own trial, on version 2
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon = start_daemon(tmp_path / "d", config)
        assert (_serving(daemon, "a"), _serving(daemon, "b")) == ("2", "2")
        deadline = time.monotonic() + 10
        while {e.get("model") for e in list(events.events) if e["kind"] == "restart"} != {"a", "b"}:
            assert time.monotonic() < deadline, events.events
            time.sleep(0.02)
        saved = {n: json.loads((jobs / f"{n}.json").read_bytes()) for n in "ab"}
        assert {n: (r["state"], len(r["trial"]["restarts"])) for n, r in saved.items()} == {
            "a": ("trial", 1),
            "b": ("trial", 1),
        }
    finally:
        code = daemon.stop()
        events.close()
    assert code == 0, daemon.stderr()
    print(f"push to serving for b while a is in trial: {took:.2f} s")
