"""The update state machine's tables, persistence, resume map and loop breaker; the model store."""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path

import msgspec
import pytest

from runtime.errors import StateError
from updater.device.state import (
    MAX_RESUMES,
    RESUME,
    TERMINAL,
    TRANSITIONS,
    Job,
    State,
    StateMachine,
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
def test_every_state_resumes_from_disk(tmp_path: Path, state: State):
    path = tmp_path / "state.json"
    machine = StateMachine(path, clock=lambda: 1.0)
    machine.record.state = state
    machine.record.job = None if state == State.IDLE else _job()
    machine.save()
    restarted = StateMachine(path, clock=lambda: 2.0)
    assert restarted.state == state
    assert restarted.resume() == RESUME[state]
    assert StateMachine(path, clock=lambda: 3.0).state == RESUME[state], "resume is persisted"


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
        assert StateMachine(path, clock=lambda: 1.0).resume() == State.VALIDATING
    final = StateMachine(path, clock=lambda: 1.0)
    assert final.resume() == State.FAILED
    assert "loop breaker" in final.record.reason


def test_loop_breaker_after_activation_rolls_back(tmp_path: Path):
    path = tmp_path / "state.json"
    machine = StateMachine(path, clock=lambda: 1.0)
    machine.record.state, machine.record.job = State.ACTIVATING, _job()
    machine.save()
    for _ in range(MAX_RESUMES):
        StateMachine(path, clock=lambda: 1.0).resume()
    assert StateMachine(path, clock=lambda: 1.0).resume() == State.ROLLED_BACK


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
