"""The repository's signing lock: one signer at a time across processes and threads, reentrant
in the thread holding it, a clear error after the timeout, released when its holder dies."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from runtime.errors import OperatorError
from telemetry.shares import ALL
from tests.support.models import classifier
from tests.support.signer import Signer
from updater.meta import Rollout
from updater.operator.repository import OperatorRepository
from updater.operator.signing_lock import signing_lock


@pytest.fixture
def repo(tmp_path: Path) -> OperatorRepository:
    r = OperatorRepository.init(tmp_path / "repo")
    r.add_model(classifier(tmp_path / "v1.onnx", seed=0), name="classifier", version="1",
                rollout=Rollout(shares={ALL: 100}))  # fmt: skip
    return r


def test_reentrant_in_its_thread_exclusive_for_others(repo: OperatorRepository):
    with signing_lock(repo.path, timeout=1), signing_lock(repo.path, timeout=1):
        errors: list[str] = []

        def other() -> None:
            try:
                with signing_lock(repo.path, timeout=0.2):
                    errors.append("taken twice")
            except OperatorError as err:
                errors.append(str(err))

        t = threading.Thread(target=other, name="test-other-signer")
        t.start()
        t.join(10)
        assert len(errors) == 1 and "held the signing lock for over 0.2 s" in errors[0]
    with signing_lock(repo.path, timeout=0.2):  # released by the outer exit only
        pass


def test_another_process_holding_it_is_a_one_line_error_and_its_death_frees_it(
    repo: OperatorRepository,
):
    other = Signer(repo.path, "classifier", {ALL: 5000})
    try:
        with pytest.raises(OperatorError) as err, signing_lock(repo.path, timeout=0.3):
            pass
        assert str(repo.path / ".signing.lock") in str(err.value)
        assert "\n" not in str(err.value)
    finally:
        other.close()  # killed while holding it: the kernel releases it
    with signing_lock(repo.path, timeout=2):
        pass


def test_the_repository_class_used_directly_waits_for_another_signer(
    repo: OperatorRepository, tmp_path: Path
):
    """A script that imports OperatorRepository, not only inferctl, never signs over a change
    another process is making."""
    other = Signer(repo.path, "classifier", {ALL: 5000})
    added = threading.Event()

    def add() -> None:
        repo.add_model(classifier(tmp_path / "v2.onnx", seed=1), name="classifier", version="2")
        added.set()

    t = threading.Thread(target=add, name="test-direct-signer")
    t.start()
    try:
        assert not added.wait(1.0), "add_model signed while another process held the lock"
        other.sign_and_release()
        assert added.wait(30)
    finally:
        other.close()
        t.join(30)
    metas = {m.version: m for _, _, m in OperatorRepository(repo.path).models()}
    assert set(metas) == {"1", "2"}
    rollout = metas["1"].rollout
    assert rollout is not None and rollout.shares == {ALL: 5000}, "the other's change is kept"
