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
