"""The console's rollout decisions: the policy as a pure function, and the autopilot signing
them into a real repository (advance after the soak, halt above the ratio, resume)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import msgspec
import pytest

from runtime.errors import OperatorError
from telemetry.fleet.rollout import RolloutSummary
from telemetry.payloads import Event, HostFacts, SlotStatus, Status, utc_now
from telemetry.shares import ALL, FULL
from tests.support.models import classifier
from tests.support.signer import Signer
from updater.meta import Rollout
from updater.operator.console.memory import memory_path
from updater.operator.console.rollouts import (
    Autopilot,
    Decision,
    Policy,
    decide,
    next_step,
    since_resume,
)
from updater.operator.repository import OperatorRepository

PREFIX = "inferd"


def _summary(**kw: object) -> RolloutSummary:
    base: dict[str, object] = dict(
        slot="classifier", version="2", seq=2, shares={ALL: 100}, shares_known=True, halted=None,
        devices=10, online=10, eligible=10, joined=10, attempted=0, succeeded=0, failed=0,
        serving=0, states={}, rate_per_s=None, eta_s=None,
    )  # fmt: skip
    return RolloutSummary(**(base | kw))  # type: ignore[arg-type]


POLICY = Policy(soak_s=60, halt_ratio=0.2, min_attempted=3, steps=(100, 1000, FULL))


def test_policy_steps_and_bounds_are_checked():
    assert next_step(POLICY, 0) == 100
    assert next_step(POLICY, 100) == 1000
    assert next_step(POLICY, 5000) == FULL
    assert next_step(POLICY, FULL) is None
    for bad in ((), (1000, 100), (0, 100), (100, FULL + 1)):
        with pytest.raises(ValueError, match="steps"):
            Policy(steps=bad)
    with pytest.raises(ValueError, match="ratio"):
        Policy(halt_ratio=1.0)


def test_nothing_to_drive_when_not_staged_or_halted():
    s = _summary(attempted=5, failed=5)
    assert decide(s, None, 1e9, POLICY) is None  # published for every device
    assert decide(s, Rollout(shares={ALL: 0}, halted="x"), 1e9, POLICY) is None


def test_halts_above_the_ratio_once_enough_devices_tried():
    r = Rollout(shares={ALL: 1000, "canary": FULL})
    assert decide(_summary(attempted=2, failed=2), r, 0, POLICY) is None  # too few to judge
    assert decide(_summary(attempted=5, failed=1, succeeded=4), r, 0, POLICY) is None  # 20 %
    d = decide(_summary(attempted=5, failed=2, succeeded=3), r, 0, POLICY)
    assert d is not None and d.action == "halt"
    assert "2 of 5 devices failed (40.0% > 20.0%)" in d.reason
    assert d.rollout.halted == d.reason
    assert set(d.rollout.shares.values()) == {0} and set(d.rollout.shares) == {ALL, "canary"}


def test_advances_one_step_after_the_soak_when_nobody_is_mid_update():
    r = Rollout(shares={ALL: 100})
    healthy = _summary(attempted=3, succeeded=3, states={"committed": 3, "waiting": 7})
    assert decide(healthy, r, 59.9, POLICY) is None
    d = decide(healthy, r, 60, POLICY)
    assert d is not None and d.action == "advance"
    assert d.rollout.shares == {ALL: 1000} and d.rollout.halted is None
    assert "3 of 3 devices updated, 0 failed, over 60 s at 1 %" in d.reason
    early_failure = _summary(attempted=2, succeeded=1, failed=1)  # too few to halt on
    assert decide(early_failure, r, 600, POLICY) is None  # ... but no step further either
    busy = _summary(attempted=3, succeeded=2, states={"committed": 2, "downloading": 1})
    assert decide(busy, r, 600, POLICY) is None
    assert decide(healthy, Rollout(shares={ALL: FULL}), 600, POLICY) is None  # complete


def test_a_resume_sets_the_failures_so_far_aside():
    s = _summary(attempted=6, failed=3, succeeded=3)
    after = since_resume(s, failed=3, attempted=6)
    assert (after.failed, after.attempted, after.failure_ratio) == (0, 0, 0.0)
    assert decide(after, Rollout(shares={ALL: 1000}), 0, POLICY) is None
    worse = since_resume(_summary(attempted=9, failed=6), failed=3, attempted=6)
    assert (worse.failed, worse.attempted) == (3, 3)


# -- the autopilot against a real repository --------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _status(device: str, version: str, state: str) -> tuple[str, bytes]:
    slot = SlotStatus(name="classifier", ready=True, version=version, runtime="onnxruntime",
                      providers=["cpu"], digest=None, signature_digest=None,
                      update_state=state)  # type: ignore[arg-type]  # fmt: skip
    status = Status(device=device, groups=["fleet"], agent_version="t", started_at=utc_now(),
                    host=HostFacts(hostname=device, arch="x", os="Linux", python="3"),
                    models=[slot])  # fmt: skip
    return f"{PREFIX}/{device}/status", msgspec.json.encode(status)


def _update(device: str, seq: int, state: str) -> tuple[str, bytes]:
    e = Event(device=device, kind="update", message=f"-> {state}", model="classifier",
              version="2", details={"state": state, "seq": seq})  # fmt: skip
    return f"{PREFIX}/{device}/events", msgspec.json.encode(e)


@pytest.fixture
def repo(tmp_path: Path) -> OperatorRepository:
    r = OperatorRepository.init(tmp_path / "repo")
    r.add_model(classifier(tmp_path / "v1.onnx", seed=0), name="classifier", version="1")
    r.add_model(classifier(tmp_path / "v2.onnx", seed=2), name="classifier", version="2",
                groups=("fleet",), rollout=Rollout(shares={ALL: 100}))  # fmt: skip
    return r


def _autopilot(repo: OperatorRepository, clock: Clock, events: list[Event]) -> Autopilot:
    return Autopilot(
        OperatorRepository(repo.path), POLICY, prefix=PREFIX, console_id="console-test",
        client=lambda: None, broker=lambda: pytest.fail("no second client"),
        on_event=events.append, clock=clock,
    )  # fmt: skip


def _shares(repo: OperatorRepository) -> Rollout | None:
    return OperatorRepository(repo.path).model("classifier")[2].rollout


def test_autopilot_advances_halts_and_resumes_through_the_repository(repo: OperatorRepository):
    clock, events = Clock(), []
    pilot = _autopilot(repo, clock, events)
    seq = repo.model("classifier")[2].seq
    assert pilot.tick() == []  # follows version 2; the soak starts now
    for d in (f"d{i}" for i in range(8)):
        pilot.feed(*_status(d, "1", "idle"))
    pilot.feed(*_update("d0", seq, "downloading"))
    clock.now += 61
    assert pilot.tick() == []  # d0 is mid-update: wait
    pilot.feed(*_update("d0", seq, "committed"))
    (d,) = pilot.tick()
    assert d.action == "advance" and _shares(repo) == Rollout(shares={ALL: 1000})
    assert events[-1].kind == "rollout" and events[-1].details["action"] == "advance"
    assert events[-1].device == "console-test" and events[-1].details["shares"] == {ALL: 1000}
    assert pilot.tick() == []  # a new soak started with the new share

    for dev, state in (("d1", "failed"), ("d2", "rolled_back"), ("d3", "committed")):
        pilot.feed(*_update(dev, seq, state))
    (d,) = pilot.tick()
    assert d.action == "halt" and "2 of 4 devices failed (50.0% > 20.0%)" in d.reason
    signed = _shares(repo)
    assert signed is not None and signed.halted == d.reason and signed.shares == {ALL: 0}
    assert events[-1].level == "warning"
    clock.now += 600
    assert pilot.tick() == []  # halted: it waits for the operator
    with pytest.raises(OperatorError, match="already halted"):
        pilot.halt("classifier")

    d = pilot.resume("classifier")
    assert d.action == "resume" and "10 %" in d.reason
    assert _shares(repo) == Rollout(shares={ALL: 1000})  # where it was halted
    assert pilot.tick() == []  # the two failures before the resume are set aside
    with pytest.raises(OperatorError, match="not halted"):
        pilot.resume("classifier")
    for dev in ("d4", "d5"):
        pilot.feed(*_update(dev, seq, "failed"))
    pilot.feed(*_update("d6", seq, "failed"))
    (d,) = pilot.tick()
    assert d.action == "halt" and "3 of 3 devices failed" in d.reason
    snap = pilot.snapshot()[0]
    assert snap["state"] == "halted"
    assert [d["action"] for d in snap["decisions"]] == ["halt", "resume", "halt", "advance"]
    assert [e.details["action"] for e in events] == ["advance", "halt", "resume", "halt"]


def test_operator_halt_and_what_cannot_be_driven(repo: OperatorRepository, tmp_path: Path):
    clock, events = Clock(), []
    pilot = _autopilot(repo, clock, events)
    d = pilot.halt("classifier")
    assert d.reason == "halted by the operator"
    assert _shares(repo) == Rollout(shares={ALL: 0}, halted="halted by the operator")
    assert pilot.resume("classifier").rollout == Rollout(shares={ALL: 100})
    with pytest.raises(OperatorError, match="nope is not published"):
        pilot.halt("nope")
    repo.add_model(classifier(tmp_path / "v3.onnx", seed=3), name="classifier", version="3")
    with pytest.raises(OperatorError, match="not staged"):
        pilot.halt("classifier")  # version 3 goes to every device: nothing to halt
    assert pilot.snapshot()[0]["version"] == "3" and pilot.snapshot()[0]["state"] == "not staged"


def test_a_decision_taken_elsewhere_first_is_not_signed_over(repo: OperatorRepository):
    clock = Clock()
    a, b = _autopilot(repo, clock, []), _autopilot(repo, clock, [])
    a.tick()
    b.tick()
    clock.now += 61
    (d,) = a.tick()
    assert d.rollout.shares == {ALL: 1000}
    stale = ("2", repo.model("classifier")[2].seq, (((ALL, 100),), None))
    assert b._apply("classifier", d, expect=stale) is None
    assert _shares(repo) == Rollout(shares={ALL: 1000})  # not raised twice
    assert b.tick() == []  # b now follows the new share, with a fresh soak


def test_a_broken_repository_is_one_line_on_the_page_not_a_dead_loop(
    repo: OperatorRepository,
):
    clock = Clock()
    pilot = _autopilot(repo, clock, [])
    pilot.tick()
    (repo.metadata_dir / "targets.json").write_text("{not json")
    assert pilot.tick() == []
    assert pilot.error is not None and "\n" not in pilot.error


def test_a_decision_waits_for_another_process_signing_and_is_not_signed_over_it(
    repo: OperatorRepository, caplog: pytest.LogCaptureFixture
):
    """An operator's ``inferctl rollout`` (here: another process holding the same lock) signs
    while the autopilot is about to advance: the autopilot waits, then sees the new shares."""
    caplog.set_level(logging.INFO, logger="updater.operator.signing_lock")
    clock = Clock()
    pilot = _autopilot(repo, clock, [])
    pilot.tick()
    clock.now += 61  # soaked: the next tick advances 1 % -> 10 %
    other = Signer(repo.path, "classifier", {ALL: 5000})
    decided: list[Decision] = []
    tick = threading.Thread(target=lambda: decided.extend(pilot.tick()), name="test-tick")
    try:
        tick.start()
        deadline = time.monotonic() + 10
        while "waiting for" not in caplog.text:
            assert time.monotonic() < deadline, "the autopilot did not wait for the lock"
            time.sleep(0.02)
        other.sign_and_release()
        tick.join(30)
    finally:
        other.close()
    assert decided == []  # the shares changed under it: it decides again at the next tick
    assert _shares(repo) == Rollout(shares={ALL: 5000})
    assert pilot.tick() == []  # and follows 50 % with a fresh soak
    assert pilot.snapshot()[0]["share_all"] == 5000


# -- what a restarted console remembers ----------------------------------------------------------


class Wall(Clock):
    def __init__(self) -> None:
        self.now = 1.7e9


def _remembering(
    repo: OperatorRepository, clock: Clock, wall: Wall, events: list[Event] | None = None
) -> Autopilot:
    return Autopilot(
        OperatorRepository(repo.path), POLICY, prefix=PREFIX, console_id="console-test",
        client=lambda: None, broker=lambda: pytest.fail("no second client"),
        on_event=(events if events is not None else []).append, clock=clock, wall=wall,
        memory=memory_path(repo.path, "console-test"),
    )  # fmt: skip


def test_a_restarted_autopilot_goes_on_with_the_soak(repo: OperatorRepository):
    wall = Wall()
    first = _remembering(repo, Clock(), wall)
    assert first.tick() == []  # the soak of 1 % starts now
    wall.now += 45
    clock = Clock()  # a new process: a new monotonic clock
    clock.now = 3.0
    again = _remembering(repo, clock, wall)
    assert again.tick() == []
    assert again.snapshot()[0]["soak_left_s"] == pytest.approx(15)  # not 60 again
    clock.now += 15
    wall.now += 15
    (d,) = again.tick()
    assert d.action == "advance" and _shares(repo) == Rollout(shares={ALL: 1000})


def test_a_restarted_autopilot_resumes_at_the_halted_share_with_its_decisions(
    repo: OperatorRepository,
):
    wall, clock = Wall(), Clock()
    first = _remembering(repo, clock, wall)
    seq = repo.model("classifier")[2].seq
    first.tick()
    clock.now += 61
    wall.now += 61
    (d,) = first.tick()
    assert d.action == "advance"  # 1 % -> 10 %
    for dev in ("d1", "d2", "d3"):
        first.feed(*_update(dev, seq, "failed"))
    (d,) = first.tick()
    assert d.action == "halt" and _shares(repo).shares == {ALL: 0}  # type: ignore[union-attr]

    wall.now += 600
    again = _remembering(repo, Clock(), wall)
    again.tick()
    snap = again.snapshot()[0]
    assert snap["halted_at"] == 1000
    assert [x["action"] for x in snap["decisions"]] == ["halt", "advance"]
    for dev in ("d1", "d2", "d3"):  # the failures, as the devices' retained status tells again
        again.feed(*_update(dev, seq, "failed"))
    d = again.resume("classifier")
    assert "10 %" in d.reason and _shares(repo) == Rollout(shares={ALL: 1000})  # not 1 %

    third = _remembering(repo, Clock(), wall)
    third.tick()
    for dev in ("d1", "d2", "d3"):
        third.feed(*_update(dev, seq, "failed"))
    assert third.tick() == []  # set aside by the resume before the restart: no halt at once
    assert [x["action"] for x in third.snapshot()[0]["decisions"]] == [
        "resume", "halt", "advance"
    ]  # fmt: skip


def test_a_missing_or_unreadable_memory_is_one_line_and_a_fresh_start(
    repo: OperatorRepository, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="updater.operator.console.memory")
    path = memory_path(repo.path, "console-test")
    wall = Wall()
    _remembering(repo, Clock(), wall).tick()
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "no saved rollout state" in caplog.text and str(path) in caplog.text
    for bad in (b"{not json", b'{"schema_version": 99}', b'{"rollouts": {"classifier": 3}}'):
        caplog.clear()
        path.write_bytes(bad)
        pilot = _remembering(repo, Clock(), wall)
        assert [r.levelname for r in caplog.records] == ["WARNING"], caplog.text
        assert "unreadable" in caplog.text or "schema version 99" in caplog.text
        assert "starting fresh" in caplog.text and "\n" not in caplog.records[0].getMessage()
        pilot.tick()
        assert pilot.snapshot()[0]["soak_left_s"] == pytest.approx(60)  # fresh
        assert b"classifier" in path.read_bytes() and path.read_bytes() != bad  # saved anew
