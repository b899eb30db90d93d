"""The update state and the model store when the disk fails or their files cannot be read: one
clear line (a StorageError naming the file and the OS's reason), and the last good file kept.
A full disk is a real small tmpfs; an I/O error on ``os.replace`` is injected."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import msgspec
import pytest

from runtime import durable
from runtime.errors import StorageError
from tests.support.faults import Failing, leftovers
from tests.support.tmpfs import fill
from updater.device.state import State, StateMachine
from updater.device.store import Entry, ModelStore


def test_update_state_that_cannot_be_saved_is_one_line_and_the_file_keeps_the_last_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "jobs" / "classifier.json"
    machine = StateMachine(path, clock=lambda: 1000.0)
    machine.transition(State.CHECKING, "check")
    monkeypatch.setattr(durable.os, "replace", Failing(errno.EIO))
    with pytest.raises(StorageError) as caught:
        machine.transition(State.IDLE, "up to date")
    monkeypatch.undo()
    assert str(caught.value) == f"{path}: cannot save update state: Input/output error"
    assert msgspec.json.decode(path.read_bytes())["state"] == "checking"
    assert StateMachine(path, clock=lambda: 1.0).state == State.CHECKING
    assert leftovers(path.parent, {"classifier.json"}) == []


def test_update_state_on_a_full_disk_is_one_line(small_disk: Path) -> None:
    path = small_disk / "jobs" / "classifier.json"
    machine = StateMachine(path, clock=lambda: 1000.0)
    machine.transition(State.CHECKING, "check")
    fill(small_disk)
    with pytest.raises(StorageError) as caught:
        machine.transition(State.IDLE, "x" * 300_000)  # a record bigger than any free page
    assert str(caught.value) == f"{path}: cannot save update state: No space left on device"
    assert StateMachine(path, clock=lambda: 1.0).state == State.CHECKING


def test_model_store_on_a_full_disk_keeps_its_record_and_leaves_no_partial_version(
    small_disk: Path, tmp_path: Path
) -> None:
    store = ModelStore(small_disk)
    first = Entry(version="1", seq=1, path=str(small_disk / "m1.onnx"), sha256="a")
    store.activate("s", first, None)
    big = tmp_path / "big.onnx"
    big.write_bytes(os.urandom(512 * 1024))
    with pytest.raises(StorageError, match="cannot stage s 2: No space left on device"):
        store.stage("s", 2, "2", {"big.onnx": big})
    assert sorted(p.name for p in (small_disk / "models" / "s").iterdir()) == ["slot.json"]
    filler = fill(small_disk)
    second = Entry(version="2", seq=2, path=str(small_disk / "m2.onnx"), sha256="b" * 100_000)
    with pytest.raises(StorageError, match=r"slot\.json: cannot save: No space left on device"):
        store.activate("s", second, None)
    assert store.record("s").active == first
    filler.unlink()
    store.activate("s", second, None)
    assert store.record("s").active == second


def test_an_unreadable_model_record_is_one_line(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    record = tmp_path / "models" / "s" / "slot.json"
    record.parent.mkdir(parents=True)
    record.write_bytes(b"{not json")
    with pytest.raises(
        StorageError, match=r"slot\.json: unreadable model record: JSON is malformed"
    ):
        store.active("s")
    record.unlink()
    record.mkdir()  # unreadable: a folder where the file should be
    with pytest.raises(StorageError, match=r"unreadable model record: .*Is a directory"):
        store.record("s")
