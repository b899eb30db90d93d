"""The update state machine's tables, persistence, restart actions and loop breaker; the
migration of the device-wide state file into per-slot jobs; the model store's containment."""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path

import msgspec
import pytest

from runtime.errors import StateError, StorageError
from telemetry.payloads import LastUpdate
from updater.device.state import (
    MAX_RESUMES,
    RESUME,
    TERMINAL,
    TRANSITIONS,
    Job,
    OnRestart,
    Record,
    State,
    StateMachine,
    TrialRecord,
    migrate_legacy,
)
from updater.device.store import Entry, ModelStore


def _reachable(start: State, edges: dict[State, frozenset[State]]) -> set[State]:
    seen, todo = {start}, deque([start])
    while todo:
        for nxt in edges[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_transition_table_is_complete():
    assert set(TRANSITIONS) == set(State)
    assert set(RESUME) == set(State)
    assert _reachable(State.IDLE, TRANSITIONS) == set(State), "every state can happen"
    for state in State:
        assert State.IDLE in _reachable(state, TRANSITIONS), f"{state} cannot get back to idle"
    for state in TERMINAL:
        assert TRANSITIONS[state] == frozenset({State.IDLE})
    # the happy path, in order
    path = ["idle", "checking", "downloading", "verifying", "staging", "validating",
            "activating", "trial", "committed", "idle"]  # fmt: skip
    for a, b in itertools.pairwise(path):
        assert State(b) in TRANSITIONS[State(a)]
    # once the store points at the candidate, only a rollback leaves
    assert State.FAILED not in TRANSITIONS[State.ACTIVATING] | TRANSITIONS[State.TRIAL]


def _job() -> Job:
    return Job(slot="classifier", version="2", seq=2, path="classifier/2/m.onnx", target={})


@pytest.mark.parametrize("state", list(State))
def test_every_state_resumes_from_disk_with_its_restart_action(tmp_path: Path, state: State):
    path = tmp_path / "classifier.json"
    machine = StateMachine(path, clock=lambda: 1.0)
    machine.record.state = state
    machine.record.job = None if state == State.IDLE else _job()
    machine.save()
    restarted = StateMachine(path, clock=lambda: 2.0)
    assert restarted.state == state
    assert restarted.resume() == RESUME[state]
    again = StateMachine(path, clock=lambda: 3.0)
    assert again.state == state, "a restart keeps the job where it was"
    assert again.record.resumes == (0 if state == State.IDLE else 1), "the restart is counted"


def test_restart_actions_say_what_each_state_needs():
    before_activation = {State.CHECKING, State.DOWNLOADING, State.VERIFYING, State.STAGING,
                         State.VALIDATING, State.ACTIVATING}  # fmt: skip
    assert {s for s, a in RESUME.items() if a is OnRestart.REPEAT} == before_activation
    assert RESUME[State.TRIAL] is OnRestart.COUNT_CRASH
    assert RESUME[State.ROLLED_BACK] is OnRestart.RESTORE_PREVIOUS
    assert RESUME[State.IDLE] is OnRestart.NOTHING
    assert {RESUME[s] for s in TERMINAL - {State.ROLLED_BACK}} == {OnRestart.FINISH}


def test_transitions_are_saved_before_the_listener_runs(tmp_path: Path):
    path = tmp_path / "state.json"
    seen = []

    def listener(before, to, rec):
        seen.append((before, to, msgspec.json.decode(path.read_bytes())["state"]))

    machine = StateMachine(path, clock=lambda: 1.0, listener=listener)
    machine.transition(State.CHECKING, "poke")
    machine.transition(State.DOWNLOADING, "found", job=_job())
    assert seen == [
        (State.IDLE, State.CHECKING, "checking"),
        (State.CHECKING, State.DOWNLOADING, "downloading"),
    ]
    with pytest.raises(StateError, match="downloading -> committed"):
        machine.transition(State.COMMITTED)
    assert StateMachine(path, clock=lambda: 1.0).record.job.version == "2"


def test_loop_breaker_fails_a_job_that_keeps_dying_in_one_state(tmp_path: Path):
    path = tmp_path / "state.json"
    machine = StateMachine(path, clock=lambda: 1.0)
    machine.transition(State.CHECKING)
    machine.transition(State.DOWNLOADING, job=_job())
    machine.transition(State.VERIFYING)
    machine.transition(State.STAGING)
    machine.transition(State.VALIDATING)
    for _ in range(MAX_RESUMES):
        assert StateMachine(path, clock=lambda: 1.0).resume() == OnRestart.REPEAT
    final = StateMachine(path, clock=lambda: 1.0)
    assert final.resume() == OnRestart.FINISH
    assert final.state == State.FAILED
    assert "loop breaker" in final.record.reason


def test_loop_breaker_after_activation_rolls_back(tmp_path: Path):
    path = tmp_path / "state.json"
    machine = StateMachine(path, clock=lambda: 1.0)
    machine.record.state, machine.record.job = State.ACTIVATING, _job()
    machine.save()
    for _ in range(MAX_RESUMES):
        StateMachine(path, clock=lambda: 1.0).resume()
    final = StateMachine(path, clock=lambda: 1.0)
    assert final.resume() == OnRestart.RESTORE_PREVIOUS
    assert final.state == State.ROLLED_BACK


def test_restarts_in_trial_are_never_broken_as_a_loop(tmp_path: Path):
    """The trial has its own breaker (crash_loop_restarts inside the window), applied by the
    updater; the generic one must not fail a job that is serving."""
    path = tmp_path / "state.json"
    machine = StateMachine(path, clock=lambda: 1.0)
    machine.record.state, machine.record.job = State.TRIAL, _job()
    machine.record.trial = TrialRecord(started_at=1.0)
    machine.save()
    for _ in range(MAX_RESUMES + 2):
        assert StateMachine(path, clock=lambda: 1.0).resume() == OnRestart.COUNT_CRASH
    assert StateMachine(path, clock=lambda: 1.0).state == State.TRIAL


def test_corrupt_state_file_starts_idle_and_keeps_the_evidence(tmp_path: Path):
    path = tmp_path / "state.json"
    path.write_bytes(b'{"state": "trial", "job": ')
    machine = StateMachine(path, clock=lambda: 1.0)
    assert machine.state == State.IDLE
    assert (tmp_path / "state.corrupt").exists()


def test_store_activate_rollback_prune(tmp_path: Path):
    store = ModelStore(tmp_path, keep=2)
    initial = tmp_path / "initial.onnx"
    initial.write_bytes(b"v1")
    config_entry = Entry(version="1", seq=0, path=str(initial), sha256="a")
    entries = []
    for seq in (2, 3, 4):
        src = tmp_path / f"m{seq}.onnx"
        src.write_bytes(f"v{seq}".encode())
        vdir = store.stage("s", seq, str(seq), {"model.onnx": src})
        entries.append(Entry(version=str(seq), seq=seq, path=str(vdir / "model.onnx")))
    store.activate("s", entries[0], config_entry)
    store.activate("s", entries[1], None)
    assert store.active("s") == entries[1]
    assert store.previous("s") == entries[0]
    # rolling back removes the failed version and is idempotent
    assert store.rollback("s", failed=entries[1]) == entries[0]
    assert store.rollback("s", failed=entries[1]) == entries[0]
    assert not Path(entries[1].path).exists()
    store.activate("s", entries[2], None)
    store.prune("s")
    rec = store.record("s")
    assert rec.active == entries[2] and rec.history == [entries[0]]
    assert initial.exists(), "the config's own model file is never deleted"
    assert sorted(p.name for p in (tmp_path / "models" / "s").iterdir() if p.is_dir()) == [
        "000002-2",
        "000004-4",
    ]


def _last(version: str, outcome: str = "committed") -> LastUpdate:
    return msgspec.convert(
        {"version": version, "seq": int(version), "outcome": outcome, "reason": "r",
         "ts": "2026-01-01T00:00:00Z"},
        LastUpdate,
    )  # fmt: skip


def test_device_wide_state_file_is_split_into_slot_jobs_once(tmp_path: Path):
    """A device upgraded in the field in the middle of a job: the job goes on in its slot, every
    slot keeps its failed versions and last outcome, the old file is kept aside, never reread."""
    work = tmp_path / "update"
    work.mkdir()
    job = Job(slot="b", version="7", seq=7, path="b/7/m.onnx", target={}, staged="/x/m.onnx")
    old = {
        "state": "trial",
        "job": msgspec.to_builtins(job),
        "entered_at": 5.0,
        "reason": "b now serves 7",
        "resumes": 1,
        "transitions": 7,
        "trial": {"started_at": 5.0, "baseline_mean_ns": 10.0, "restarts": [6.0]},
        "failed": {"a": [3, 4], "b": [5]},
        "last": {"a": msgspec.to_builtins(_last("2"))},
    }
    (work / "state.json").write_bytes(msgspec.json.encode(old))
    assert migrate_legacy(work / "state.json", work / "jobs") == ["a", "b"]
    a = StateMachine(work / "jobs" / "a.json", clock=lambda: 9.0).record
    b = StateMachine(work / "jobs" / "b.json", clock=lambda: 9.0).record
    assert (a.state, a.job, a.failed, a.last) == (State.IDLE, None, [3, 4], _last("2"))
    assert (b.state, b.job, b.failed, b.last) == (State.TRIAL, job, [5], None)
    assert b.trial == TrialRecord(started_at=5.0, baseline_mean_ns=10.0, restarts=[6.0])
    assert (b.entered_at, b.resumes, b.transitions) == (5.0, 1, 7)
    assert not (work / "state.json").exists()
    assert (work / "state.json.migrated").exists(), "kept as evidence"
    # a second start finds nothing to migrate and leaves the slots' records alone
    StateMachine(work / "jobs" / "a.json", clock=lambda: 9.0).transition(State.CHECKING)
    assert migrate_legacy(work / "state.json", work / "jobs") == []
    assert StateMachine(work / "jobs" / "a.json", clock=lambda: 9.0).state == State.CHECKING


def test_unreadable_device_wide_state_file_is_moved_aside(tmp_path: Path):
    legacy = tmp_path / "state.json"
    legacy.write_bytes(b'{"state": "trial", "job": ')
    assert migrate_legacy(legacy, tmp_path / "jobs") == []
    assert (tmp_path / "state.corrupt").exists() and not (tmp_path / "jobs").exists()


def test_slot_record_round_trips(tmp_path: Path):
    rec = Record(failed=[2], last=_last("3", "rolled_back"))
    path = tmp_path / "s.json"
    machine = StateMachine(path, clock=lambda: 1.0)
    machine.record = rec
    machine.save()
    assert StateMachine(path, clock=lambda: 1.0).record == rec


@pytest.mark.parametrize("version", ["x/../../../../escaped", "../../../escaped", "a/b"])
def test_store_refuses_a_version_dir_outside_the_slot_folder(tmp_path: Path, version: str):
    state = tmp_path / "state"
    victim = tmp_path / "escaped"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    src = tmp_path / "m.onnx"
    src.write_bytes(b"model")
    store = ModelStore(state)
    with pytest.raises(StorageError, match="not a folder inside"):
        store.stage("s", 2, version, {"model.onnx": src})
    assert (victim / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escaped", "m.onnx"]


def test_store_never_deletes_outside_the_slot_folder(tmp_path: Path):
    store = ModelStore(tmp_path / "state")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "m.onnx").write_bytes(b"x")
    store.discard("s", outside)
    store.discard("s", tmp_path / "state" / "models" / "s" / ".." / ".." / ".." / "outside")
    assert (outside / "m.onnx").exists()
    with pytest.raises(StorageError, match="is not a file name"):
        store.stage("s", 2, "2", {"../m.onnx": outside / "m.onnx"})
