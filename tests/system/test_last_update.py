"""How a slot's last update job ended, in the retained status: set by real devices updating
from a real repository, kept across a daemon restart, valid against the status schema, and
enough for ``inferctl rollout`` started after a wave to see its failures and halt it."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from agent import __version__
from agent.reporting import host_facts, slot_status
from telemetry import schemas
from telemetry.fleet.rollout import RolloutTally
from telemetry.payloads import Event, LastUpdate, Status, utc_now
from telemetry.shares import ALL
from tests.support.broker import Broker, Capture, publisher
from tests.support.daemon import start_daemon
from tests.support.fleet import ids_by_bucket, inferctl_process, send, status_payload
from tests.support.models import classifier
from tests.support.tuf_repo import Device, TufRepo
from updater.device.state import StateMachine, migrate_legacy
from updater.meta import Rollout
from updater.operator.rollout import EXIT_HALTED

PREFIX = "inferd"
STATUS = jsonschema.Draft202012Validator(
    schemas.load("status"), format_checker=jsonschema.FormatChecker()
)


def _status_of(name: str, device: Device) -> bytes:
    """The retained status the agent would publish for this device (the agent's own builder)."""
    return msgspec.json.encode(
        Status(
            device=name,
            groups=["fleet"],
            agent_version=__version__,
            started_at=utc_now(),
            host=host_facts(),
            models=[slot_status(device.slot)],
        )
    )


def _recording(name: str, device: Device, out: list[tuple[str, bytes]]) -> Callable[..., None]:
    """An emit that also keeps each event as the agent's link would publish it, when emitted."""

    def emit(kind: str, message: str, *, level: Any = "info", model: Any = None,
             version: Any = None, **details: Any) -> None:  # fmt: skip
        device.emit(kind, message, level=level, model=model, version=version, **details)
        event = Event(device=name, kind=kind, level=level, message=message, model=model,
                      version=version, details=details)  # fmt: skip
        out.append((f"{PREFIX}/{name}/events", msgspec.json.encode(event)))

    return emit


@pytest.fixture
def wave(tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path) -> dict:
    """A finished wave of version 2 at 50 %: 2 devices fail validation, 1 is rolled back by the
    operator after committing, 3 commit, and one device outside the share never tries."""
    joiners = ids_by_bucket("classifier", "2", 5000, n=6)
    (outsider,) = ids_by_bucket("classifier", "2", 5000, above=True)
    v1 = classifier(tmp_path / "v1.onnx", seed=0)
    v1_wide = classifier(tmp_path / "v1-wide.onnx", n_features=5, seed=0)  # v2 will not fit
    events: list[tuple[str, bytes]] = []
    devices: dict[str, Device] = {}
    for i, name in enumerate([*joiners, outsider]):
        dev = update_device(v1_wide if i < 2 else v1, device_id=name, groups=("fleet",))
        dev.updater.emit = _recording(name, dev, events)
        devices[name] = dev
    meta = tuf_repo.publish(
        classifier(tmp_path / "v2.onnx", seed=2),
        "2",
        groups=("fleet",),
        rollout=Rollout(shares={ALL: 5000}),
    )
    for dev in devices.values():
        dev.check()
    devices[joiners[2]].updater.request_rollback("classifier")
    devices[joiners[2]].updater.run_pending()
    return {"devices": devices, "joiners": joiners, "outsider": outsider, "meta": meta,
            "events": events}  # fmt: skip


def _outcomes(devices: dict[str, Device]) -> dict[str, str | None]:
    return {
        n: d.slot.last_update.outcome if d.slot.last_update else None for n, d in devices.items()
    }


def test_devices_record_how_their_job_ended_in_the_status(wave: dict) -> None:
    devices, joiners, seq = wave["devices"], wave["joiners"], wave["meta"].seq
    assert _outcomes(devices) == {
        **dict.fromkeys(joiners[:2], "failed"),
        joiners[2]: "rolled_back",
        **dict.fromkeys(joiners[3:], "committed"),
        wave["outsider"]: None,
    }
    failed = devices[joiners[0]].slot.last_update
    assert failed is not None and (failed.version, failed.seq) == ("2", seq)
    assert "has shape" in failed.reason
    assert devices[joiners[2]].slot.last_update.reason == "operator rollback"  # type: ignore[union-attr]
    for name, dev in devices.items():
        payload = json.loads(_status_of(name, dev))
        STATUS.validate(payload)
        (model,) = payload["models"]
        assert model["update_state"] in ("idle", "committed", "failed", "rolled_back")
        assert (model["last_update"] or {}).get("outcome") == _outcomes(devices)[name]


def test_rollout_run_after_the_wave_sees_its_failures_and_halts(
    wave: dict, tuf_repo: TufRepo, broker: Broker, capture_factory: Callable[..., Capture]
) -> None:
    repo_dir = str(tuf_repo.repo.path)
    pub = publisher(broker)
    for name, dev in wave["devices"].items():
        send(pub, f"{PREFIX}/{name}/status", _status_of(name, dev), retain=True)
    pub.disconnect()
    pub.loop_stop()
    cap = capture_factory(broker, f"{PREFIX}/groups/fleet/update")
    # every device has finished and no event will come: only the retained status tells
    proc = inferctl_process("rollout", "classifier", "--repo", repo_dir, "--window", "1",
                     "--halt-ratio", "0.2", "--min-attempted", "3",
                     "--broker", f"{broker.host}:{broker.port}")  # fmt: skip
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_HALTED, out + err
    assert "HALTED classifier 2: 3 of 6 devices failed (50.0% > 20.0%)" in out
    assert "succeeded 3; failed 3" in out
    for name in wave["joiners"][:3]:
        assert f"failed on {name}: " in out
    assert "operator rollback" in out and "has shape" in out
    meta = tuf_repo.repo.model("classifier")[2]
    assert meta.rollout is not None and set(meta.rollout.shares.values()) == {0}
    assert meta.rollout.halted is not None and "3 of 6" in meta.rollout.halted
    assert cap.wait(lambda: bool(cap.messages), 5)
    assert json.loads(cap.messages[-1].payload)["halted"] == meta.rollout.halted


def _tally(seq: int) -> RolloutTally:
    return RolloutTally(PREFIX, "classifier", "2", seq=seq, target_groups=("fleet",),
                        shares={ALL: 5000})  # fmt: skip


def test_events_and_retained_status_count_each_device_once(wave: dict) -> None:
    seq = wave["meta"].seq
    statuses = [(f"{PREFIX}/{n}/status", _status_of(n, d)) for n, d in wave["devices"].items()]
    seen = []
    for feed in (statuses, wave["events"], [*wave["events"], *statuses],
                 [*statuses, *wave["events"]]):  # fmt: skip
        t = _tally(seq)
        for topic, payload in feed:
            t.feed(topic, payload)
        s = t.summary()
        seen.append((s.attempted, s.failed, s.succeeded, sorted(d for d, _ in s.failures)))
    assert seen[0] == (6, 3, 3, sorted(wave["joiners"][:3]))
    assert seen[1:] == [seen[0]] * 3, seen


def test_an_event_newer_than_the_retained_outcome_wins() -> None:
    t = _tally(5)
    before = utc_now() - timedelta(minutes=5)
    withdrawn = LastUpdate(version="2", seq=5, outcome="withdrawn", reason="halted", ts=before)
    status = msgspec.json.decode(status_payload("d1", "1", "idle"), type=Status)
    status.models[0].last_update = withdrawn
    t.feed(f"{PREFIX}/d1/status", msgspec.json.encode(status))
    assert t.summary().states == {"withdrawn": 1}
    # the share was raised again: the device joins anew, its status still says withdrawn
    details = {"state": "downloading", "seq": 5}
    again = Event(device="d1", kind="update", message="checking -> downloading",
                  model="classifier", version="2", details=details)  # fmt: skip
    t.feed(f"{PREFIX}/d1/events", msgspec.json.encode(again))
    assert t.summary().states == {"downloading": 1}
    # an outcome for another seq of the version is not this rollout's
    status.models[0].last_update = LastUpdate(
        version="2", seq=4, outcome="failed", reason="x", ts=utc_now() + timedelta(seconds=1)
    )
    t2 = _tally(5)
    t2.feed(f"{PREFIX}/d1/status", msgspec.json.encode(status))
    assert t2.summary().failed == 0


def test_last_update_is_published_and_survives_a_daemon_restart(
    broker: Broker, tuf_repo: TufRepo, capture_factory: Callable[..., Capture], tmp_path: Path
) -> None:
    prefix = f"inferd-test-{uuid.uuid4().hex[:8]}"
    # the published version does not fit the slot's interface: validation fails
    seq = tuf_repo.publish(classifier(tmp_path / "v2.onnx", n_features=5, seed=2), "2").seq
    config: dict[str, Any] = {
        "device_id": "pi-restart",
        "models": [{"name": "classifier", "path": str(classifier(tmp_path / "v1.onnx"))}],
        "mqtt": {
            "enabled": True,
            "host": broker.host,
            "port": broker.port,
            "topic_prefix": prefix,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
        },
        "updates": {
            "repository_url": tuf_repo.url,
            "trusted_root": str(tuf_repo.trusted_root),
            "poll_interval_s": 3600,
            "check_on_start": True,
            "validation_runs": 5,
        },
    }
    cap = capture_factory(broker, f"{prefix}/pi-restart/status")

    def lasts(start: int = 0) -> list[dict]:
        out = []
        for m in cap.on("/status")[start:]:
            payload = json.loads(m.payload)
            if payload["state"] == "online" and payload["models"][0]["last_update"]:
                out.append(payload)
        return out

    run = tmp_path / "d"
    run.mkdir()
    daemon = start_daemon(run, config)
    try:
        assert cap.wait(lambda: bool(lasts()), 30), daemon.stderr()
        first = lasts()[0]
        STATUS.validate(first)
        last = first["models"][0]["last_update"]
        assert (last["version"], last["seq"], last["outcome"]) == ("2", seq, "failed")
        assert "has shape" in last["reason"]
        assert daemon.stop() == 0
        mark = len(cap.on("/status"))
        config["updates"]["check_on_start"] = False  # nothing new happens after the restart
        daemon = start_daemon(run, config)
        assert cap.wait(lambda: bool(lasts(mark)), 30), daemon.stderr()
        again = lasts(mark)[0]
        STATUS.validate(again)
        assert again["started_at"] != first["started_at"]  # a new process said it
        assert again["models"][0]["last_update"] == last
        assert again["models"][0]["version"] == "1"
    finally:
        assert daemon.stop() == 0


def test_payloads_and_state_files_from_before_last_update_still_decode(tmp_path: Path) -> None:
    old = json.loads(status_payload("d1", "1", "idle"))
    del old["models"][0]["last_update"]
    decoded = msgspec.json.decode(json.dumps(old).encode(), type=Status)
    assert decoded.models[0].last_update is None
    STATUS.validate(old)
    state = tmp_path / "update" / "state.json"
    state.parent.mkdir()
    state.write_text('{"state": "idle", "failed": {"classifier": [3]}}')
    assert migrate_legacy(state, tmp_path / "update" / "jobs") == ["classifier"]
    machine = StateMachine(tmp_path / "update" / "jobs" / "classifier.json", time.time)
    assert machine.record.last is None and machine.record.failed == [3]
