"""A daemon whose update state or model record cannot be read boots on its config's models.

The state dir comes from a real update (a signed repository over HTTP, a device that installed
version 2); then the file is damaged the way a disk or a hand breaks it, and a real
``inferd run`` must still serve, on the model its config names, with one clear line in its log
and no traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import running_daemon
from tests.support.models import classifier
from tests.support.tuf_repo import Device, TufRepo

LINE = "updates: cannot read the update state, starting on the config's models"


def _installed(tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path) -> Path:
    """A state dir where version 2 of ``classifier`` was installed and committed."""
    state = tmp_path / "state"
    device = update_device(classifier(tmp_path / "v1.onnx"), state_dir=state)
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    device.check()
    assert device.version == "2"
    device.updater.stop()
    return state


def _config(tuf_repo: TufRepo, tmp_path: Path, state: Path) -> dict[str, Any]:
    return {
        "state_dir": str(state),
        "models": [{"name": "classifier", "path": str(tmp_path / "v1.onnx")}],
        "updates": {
            "repository_url": tuf_repo.url,
            "trusted_root": str(tuf_repo.trusted_root),
            "check_on_start": False,
            "poll_interval_s": 3600,
        },
    }


def _served_version(daemon: Any) -> str:
    status, body = daemon.request("GET", "/v2/models/classifier")
    assert status == 200, body
    return str(body["versions"][0])


def test_an_intact_state_dir_boots_the_installed_version(
    tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path
) -> None:
    """The premise of the faults below: undamaged, the same state dir boots version 2."""
    state = _installed(tuf_repo, update_device, tmp_path)
    with running_daemon(tmp_path, _config(tuf_repo, tmp_path, state)) as daemon:
        assert _served_version(daemon) == "2"


def _damage_model_record(state: Path) -> None:
    (state / "models" / "classifier" / "slot.json").write_bytes(b"\x00\x17 not json")


def _directory_for_job_state(state: Path) -> None:
    job = state / "update" / "jobs" / "classifier.json"
    job.unlink()
    job.mkdir()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_damage_model_record, "unreadable model record"),
        (_directory_for_job_state, "cannot read update state: Is a directory"),
    ],
    ids=["model-record-garbage", "job-state-unreadable"],
)
def test_unreadable_update_state_boots_the_config_model_with_one_line(
    tuf_repo: TufRepo,
    update_device: Callable[..., Device],
    tmp_path: Path,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    state = _installed(tuf_repo, update_device, tmp_path)
    damage(state)
    with running_daemon(tmp_path, _config(tuf_repo, tmp_path, state)) as daemon:
        assert _served_version(daemon) == "1", "the config's model serves"
        status, body = daemon.infer(
            "classifier", [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]
        )
        assert status == 200, body
    log = daemon.stderr()
    assert "Traceback" not in log, log
    # one line at the boot plan, one when the updater declines to run jobs it cannot resume
    errors = [line.split(" ERROR ", 1)[1] for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 2 and all(reason in e for e in errors), log
    assert errors[0].startswith(f"agent.updates: {LINE}: "), errors
    assert errors[1].startswith(
        "updater.device.updater: updates: not started until the update state is readable: "
    ), errors
