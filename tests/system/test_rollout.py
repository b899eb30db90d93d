"""Staged rollouts: the stable hash, the device's decision against a real repository over HTTP,
raising a share, and ``inferctl rollout`` tallying real broker messages and halting."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from telemetry.fleet.rollout import RolloutTally, render
from telemetry.payloads import Event, Offline
from telemetry.shares import ALL, FULL, bucket, joins, share_of
from tests.support.broker import Broker, Capture, publisher
from tests.support.fleet import ids_by_bucket, inferctl_process, send, status_payload
from tests.support.models import classifier
from tests.support.tuf_repo import TufRepo
from updater.inferctl.main import main as inferctl
from updater.meta import Rollout
from updater.operator.rollout import EXIT_HALTED

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "inferd"


def test_bucket_is_stable_across_processes_and_salted_by_slot_and_version():
    here = [bucket(f"pi-{i}", "classifier", "2") for i in range(50)]
    code = (
        "from telemetry.shares import bucket; "
        "print([bucket(f'pi-{i}', 'classifier', '2') for i in range(50)])"
    )
    # a different hash seed in the child: the bucket must not depend on Python's hash()
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin"},
    )
    assert json.loads(out.stdout) == here
    assert all(0 <= b < FULL for b in here)
    other = [bucket(f"pi-{i}", "classifier", "3") for i in range(50)]
    assert other != here  # another version picks other devices


@pytest.mark.parametrize("pct", [1, 10, 25, 50, 90])
def test_share_of_10k_devices_matches_the_percentage(pct):
    ids = [f"device-{i:05d}" for i in range(10_000)]
    shares = {ALL: pct * 100}
    joined = [d for d in ids if joins(shares, d, (), "classifier", "7")]
    assert abs(len(joined) / len(ids) - pct / 100) < 0.015
    # raising the share keeps every device that had joined
    more = {d for d in ids if joins({ALL: pct * 100 + 500}, d, (), "classifier", "7")}
    assert set(joined) <= more
    # and each version draws its own sample
    other = {d for d in ids if joins(shares, d, (), "classifier", "8")}
    assert other != set(joined)


def test_share_of_groups_takes_the_most_generous_and_defaults():
    shares = {ALL: 1000, "canary": FULL, "kitchen": 0}
    assert share_of(shares, ("canary", "kitchen")) == FULL
    assert share_of(shares, ("kitchen",)) == 0
    assert share_of(shares, ("garage",)) == 1000
    assert share_of(shares, ()) == 1000
    assert share_of({"canary": FULL}, ("garage",)) == 0
    assert joins(None, "anything", (), "s", "v")  # not staged: everyone


# -- the device's decision against a real repository -----------------------------------------


def _artifact_gets(tuf: TufRepo, version: str) -> list[str]:
    return [r for r in tuf.server.requests if f"/targets/classifier/{version}/" in r]


def test_device_outside_the_rollout_does_not_download_until_the_share_is_raised(
    tuf_repo, update_device, tmp_path
):
    v1 = classifier(tmp_path / "v1.onnx", seed=0)
    (inside,) = ids_by_bucket("classifier", "2", 2500)
    (outside,) = ids_by_bucket("classifier", "2", 2500, above=True)
    dev_in = update_device(v1, device_id=inside)
    dev_out = update_device(v1, device_id=outside)
    tuf_repo.publish(
        classifier(tmp_path / "v2.onnx", seed=2), "2", rollout=Rollout(shares={ALL: 2500})
    )
    dev_out.check()
    assert dev_out.version == "1"
    assert dev_out.states() == ["checking", "idle"]
    assert _artifact_gets(tuf_repo, "2") == []  # it read the metadata and nothing else
    dev_in.check()
    assert dev_in.version == "2"
    assert len(_artifact_gets(tuf_repo, "2")) == 1

    # raising the share to 100 % brings the other device in, same seq, nothing else changed
    meta = tuf_repo.repo.set_rollout("classifier", "2", Rollout(shares={ALL: FULL}))
    assert meta.seq == tuf_repo.repo.model("classifier")[2].seq
    dev_out.check()
    assert dev_out.version == "2"
    assert len(_artifact_gets(tuf_repo, "2")) == 2


def test_group_share_and_an_older_version_for_devices_left_out(tuf_repo, update_device, tmp_path):
    v1 = classifier(tmp_path / "v1.onnx", seed=0)
    (name,) = ids_by_bucket("classifier", "3", FULL)  # any id: shares decide by group here
    canary = update_device(v1, device_id=name, groups=("canary",))
    other = update_device(v1, device_id=name + "-x", groups=("kitchen",))
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    tuf_repo.publish(
        classifier(tmp_path / "v3.onnx", seed=3),
        "3",
        rollout=Rollout(shares={ALL: 0, "canary": FULL}),
    )
    canary.check()
    other.check()
    assert canary.version == "3"
    assert other.version == "2"  # the newest version it is in, not nothing
    assert _artifact_gets(tuf_repo, "3") and len(_artifact_gets(tuf_repo, "3")) == 1


def test_halting_does_not_take_a_joined_device_back_down(tuf_repo, update_device, tmp_path):
    device = update_device(classifier(tmp_path / "v1.onnx", seed=0))
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    tuf_repo.publish(classifier(tmp_path / "v3.onnx", seed=3), "3")
    device.check()
    assert device.version == "3"
    tuf_repo.repo.set_rollout("classifier", "3", Rollout(shares={ALL: 0}, halted="test"))
    device.events.clear()
    device.check()
    assert device.version == "3"
    assert device.states() == ["checking", "idle"]


def test_a_halt_during_the_download_withdraws_the_job(tuf_repo, update_device, tmp_path):
    device = update_device(classifier(tmp_path / "v1.onnx", seed=0))
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")

    def emit(kind: str, message: str, **fields: object) -> None:
        device.emit(kind, message, **fields)
        if fields.get("state") == "downloading":  # the operator halts, the poke arrives
            tuf_repo.repo.set_rollout("classifier", "2", Rollout(shares={ALL: 0}, halted="x"))
            device.updater.request_check("poke")

    device.updater.emit = emit
    device.check()
    assert device.version == "1"
    assert device.states() == ["checking", "downloading", "checking", "idle"]
    (withdrawn,) = [f for k, _, f in device.events if k == "update-withdrawn"]
    assert withdrawn["version"] == "2" and withdrawn["seq"] > 0
    assert device.slot.update_state == "idle"
    assert list((device.state_dir / "models").glob("classifier/*-2")) == []


def test_a_malformed_rollout_is_refused_by_the_repository(tuf_repo, tmp_path):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"shares": {ALL: FULL + 1}}, Rollout)
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    with pytest.raises(Exception, match="group"):
        tuf_repo.repo.set_rollout("classifier", "2", Rollout(shares={"bad group!": 10}))


# -- the tally --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _update(device: str, version: str, seq: int, state: str, message: str = "") -> bytes:
    return msgspec.json.encode(
        Event(
            device=device,
            kind="update",
            level="error" if state in ("failed", "rolled_back") else "info",
            message=message or f"-> {state}",
            model="classifier",
            version=version,
            details={"state": state, "seq": seq, "terminal": state == "committed"},
        )
    )


def test_tally_counts_states_failures_and_eta():
    clock = Clock()
    devices = [f"d{i:02d}" for i in range(40)]
    shares = {ALL: 5000}
    t = RolloutTally(
        PREFIX,
        "classifier",
        "2",
        seq=5,
        target_groups=("fleet",),
        shares=shares,
        clock=clock,
    )
    for d in devices:
        t.feed(f"{PREFIX}/{d}/status", status_payload(d, "1", "idle"))
    t.feed(f"{PREFIX}/outsider/status", status_payload("outsider", "1", "idle", groups=("lab",)))
    joined = [d for d in devices if joins(shares, d, ("fleet",), "classifier", "2")]
    s = t.summary()
    assert (s.devices, s.online, s.eligible) == (41, 41, 40)
    assert s.joined == len(joined) and s.states == {"waiting": len(joined)}
    assert s.attempted == 0 and s.eta_s is None
    # half of them start; 2 of those fail, the rest commit, after 10 s
    started = joined[: len(joined) // 2]
    for d in started:
        t.feed(f"{PREFIX}/{d}/events", _update(d, "2", 5, "downloading"))
    # an event of another version of the slot is not this rollout's
    t.feed(f"{PREFIX}/{joined[-1]}/events", _update(joined[-1], "9", 9, "failed"))
    clock.now += 10
    for d in started[:2]:
        t.feed(f"{PREFIX}/{d}/events", _update(d, "2", 5, "failed", "candidate does not load"))
    for d in started[2:]:
        t.feed(f"{PREFIX}/{d}/events", _update(d, "2", 5, "committed"))
        t.feed(f"{PREFIX}/{d}/status", status_payload(d, "2", "committed"))
    s = t.summary()
    assert s.attempted == len(started)
    assert s.failed == 2 and s.succeeded == len(started) - 2 == s.serving
    assert s.failure_ratio == pytest.approx(2 / len(started))
    assert s.states["waiting"] == len(joined) - len(started)
    assert s.rate_per_s == pytest.approx(len(started) / 10)
    assert s.eta_s == pytest.approx((len(joined) - len(started)) / (len(started) / 10))
    assert [r for _, r in s.failures] == ["candidate does not load"] * 2
    text = render(s)
    assert "classifier 2 (seq 5): rollout 50 %" in text and "failed 2" in text
    # an agent going offline keeps its last known version
    t.feed(f"{PREFIX}/{started[3]}/status", msgspec.json.encode(Offline(device=started[3])))
    assert t.summary().online == 40 and t.summary().serving == s.serving
    # the rest start, then the rollout is halted under them: they withdraw, nothing is left
    rest = joined[len(started) :]
    for d in rest:
        t.feed(f"{PREFIX}/{d}/events", _update(d, "2", 5, "downloading"))
    assert not t.summary().settled
    withdrawn = Event(device="x", kind="update-withdrawn", message="no longer offered",
                      model="classifier", version="2", details={"seq": 5})  # fmt: skip
    for d in rest:
        t.feed(f"{PREFIX}/{d}/events", msgspec.json.encode(withdrawn))
    s = t.summary()
    assert s.states["withdrawn"] == len(rest) and s.settled and s.failed == 2


def test_tally_without_a_version_follows_the_newest_poke():
    t = RolloutTally(PREFIX, "classifier")
    assert "no rollout seen" in render(t.summary())
    poke = {"model": "classifier", "version": "4", "seq": 9, "groups": [], "rollout": {ALL: 0}}
    t.feed(f"{PREFIX}/groups/fleet/update", json.dumps(poke).encode())
    t.feed(f"{PREFIX}/groups/fleet/update", json.dumps({**poke, "model": "other"}).encode())
    t.feed(f"{PREFIX}/d1/status", status_payload("d1", "3", "idle"))
    s = t.summary()
    assert (s.version, s.seq, s.shares, s.joined) == ("4", 9, {ALL: 0}, 0)


# -- inferctl rollout against a real broker -------------------------------------------------


@pytest.fixture
def staged_repo(tuf_repo: TufRepo, tmp_path: Path) -> TufRepo:
    tuf_repo.publish(
        classifier(tmp_path / "v2.onnx", seed=2),
        "2",
        groups=("fleet",),
        rollout=Rollout(shares={ALL: 1000}),
    )
    return tuf_repo


def test_inferctl_rollout_raises_the_share_signs_pokes_and_tallies(
    staged_repo: TufRepo, broker: Broker, capture_factory: Callable[..., Capture], capsys
):
    repo_dir = str(staged_repo.repo.path)
    cap = capture_factory(broker, f"{PREFIX}/groups/#")
    pub = publisher(broker)
    devices = [f"pi-{i:02d}" for i in range(30)]
    for d in devices:
        send(pub, f"{PREFIX}/{d}/status", status_payload(d, "1", "idle"), retain=True)
    before = staged_repo.repo.timestamp().version
    broker_at = f"{broker.host}:{broker.port}"
    args = ["rollout", "classifier", "--repo", repo_dir, "--percent", "40", "--group", "canary"]
    code = inferctl([*args, "--window", "0.5", "--broker", broker_at])
    out = capsys.readouterr().out
    assert code == 0, out
    meta = staged_repo.repo.model("classifier")[2]
    assert meta.rollout is not None and meta.rollout.shares == {ALL: 1000, "canary": 4000}
    assert staged_repo.repo.timestamp().version > before  # re-signed down to the timestamp
    assert "rollout 10 % -> 10 % (canary 40 %)" in out
    assert "poked canary, fleet" in out
    assert cap.wait(lambda: len(cap.messages) >= 2, 5)
    poke = json.loads(cap.on("/groups/fleet/update")[-1].payload)
    assert poke["version"] == "2" and poke["rollout"] == {ALL: 1000, "canary": 4000}
    expected = [d for d in devices if bucket(d, "classifier", "2") < 1000]
    assert f"{len(expected)} in the rollout, 0 attempted" in out
    assert "30 known, 30 online, 30 in the target groups" in out

    # model list shows the staged share
    assert inferctl(["model", "list", repo_dir]) == 0
    assert "rollout 10 % (canary 40 %)" in capsys.readouterr().out
    pub.disconnect()
    pub.loop_stop()


def test_failure_ratio_over_the_threshold_halts_the_rollout(
    staged_repo: TufRepo, broker: Broker, capture_factory: Callable[..., Capture]
):
    repo_dir = str(staged_repo.repo.path)
    seq = staged_repo.repo.model("classifier")[2].seq
    cap = capture_factory(broker, f"{PREFIX}/groups/fleet/update")
    pub = publisher(broker)
    proc = inferctl_process(
        "rollout", "classifier", "--repo", repo_dir, "--follow", "--interval", "0.2",
        "--halt-ratio", "0.2", "--min-attempted", "4",
        "--broker", f"{broker.host}:{broker.port}",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert "classifier 2" in proc.stdout.readline()  # subscribed, first tally printed
        devices = [f"pi-{i}" for i in range(5)]
        for d in devices:
            send(pub, f"{PREFIX}/{d}/status", status_payload(d, "1", "downloading"), retain=True)
            send(pub, f"{PREFIX}/{d}/events", _update(d, "2", seq, "downloading"))
        # one failure in five is 20 %: not over the ratio yet
        send(pub, f"{PREFIX}/pi-0/events", _update("pi-0", "2", seq, "failed", "bad golden"))
        time.sleep(1.0)
        assert proc.poll() is None
        send(pub, f"{PREFIX}/pi-1/events", _update("pi-1", "2", seq, "rolled_back", "crash"))
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_HALTED, err
    assert "HALTED classifier 2: 2 of 5 devices failed (40.0% > 20.0%)" in out
    meta = staged_repo.repo.model("classifier")[2]
    assert meta.rollout is not None and set(meta.rollout.shares.values()) == {0}
    assert meta.rollout.halted is not None and "2 of 5" in meta.rollout.halted
    assert cap.wait(lambda: bool(cap.messages), 5)
    assert json.loads(cap.messages[-1].payload)["halted"] == meta.rollout.halted

    # looking again says halted (exit 3) and shows the signed reason
    again = inferctl_process("rollout", "classifier", "--repo", repo_dir, "--window", "0.3",
                      "--broker", f"{broker.host}:{broker.port}")  # fmt: skip
    text, _ = again.communicate(timeout=20)
    assert again.returncode == EXIT_HALTED
    assert "rollout 0 %; HALTED: 2 of 5 devices failed" in text
    # raising the share again resumes it
    assert inferctl(["rollout", "classifier", "--repo", repo_dir, "--percent", "5",
                     "--window", "0", "--no-poke"]) == 0  # fmt: skip
    meta = staged_repo.repo.model("classifier")[2]
    assert meta.rollout is not None and meta.rollout.halted is None
    assert meta.rollout.shares[ALL] == 500
    pub.disconnect()
    pub.loop_stop()


def test_rollout_mistakes_are_one_clear_line(staged_repo, capsys):
    repo_dir = str(staged_repo.repo.path)
    assert inferctl(["rollout", "nope", "--repo", repo_dir, "--percent", "5"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["inferctl: nope is not published"]
    assert inferctl(["rollout", "classifier", "--repo", repo_dir, "--percent", "500"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["inferctl: 500 is not a percentage between 0 and 100"]


def test_inferctl_watch_rollout_shows_states_failures_and_eta(broker: Broker):
    pub = publisher(broker)
    poke = {"model": "classifier", "version": "2", "seq": 7, "groups": ["fleet"],
            "rollout": {ALL: 5000}, "halted": None, "by": "inferctl rollout"}  # fmt: skip
    send(pub, f"{PREFIX}/groups/fleet/update", json.dumps(poke).encode(), retain=True)
    devices = [f"pi-{i:02d}" for i in range(20)]
    for d in devices:
        send(pub, f"{PREFIX}/{d}/status", status_payload(d, "1", "idle"), retain=True)
    joined = [d for d in devices if bucket(d, "classifier", "2") < 5000]
    watch = inferctl_process("watch", "--rollout", "classifier", "--json", "--wait", "4",
                      "--broker", f"{broker.host}:{broker.port}")  # fmt: skip
    time.sleep(2.0)  # the watcher has subscribed: events are not retained
    for d in joined[:3]:
        send(pub, f"{PREFIX}/{d}/events", _update(d, "2", 7, "downloading"))
    send(pub, f"{PREFIX}/{joined[0]}/events", _update(joined[0], "2", 7, "failed", "no"))
    for d in joined[1:3]:
        send(pub, f"{PREFIX}/{d}/events", _update(d, "2", 7, "committed"))
        send(pub, f"{PREFIX}/{d}/status", status_payload(d, "2", "committed"), retain=True)
    out, err = watch.communicate(timeout=20)
    assert watch.returncode == 0, err
    s = json.loads(out)
    assert (s["version"], s["seq"], s["shares"]) == ("2", 7, {ALL: 5000})
    assert s["devices"] == 20 and s["joined"] == len(joined)
    assert (s["attempted"], s["failed"], s["succeeded"], s["serving"]) == (3, 1, 2, 2)
    assert s["states"] == {"committed": 2, "failed": 1, "waiting": len(joined) - 3}
    assert s["eta_s"] is not None and s["rate_per_s"] > 0
    assert s["failures"] == [{"device": joined[0], "reason": "no"}]
    pub.disconnect()
    pub.loop_stop()
