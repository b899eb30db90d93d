"""TUF against a real signed repository over HTTP: expired targets, snapshot and root metadata,
a root threshold above one, a target naming a golden or reference file that is not itself
signed, and ``inferctl repo refresh`` re-signing metadata close to expiry.

Each refusal leaves the device on the version it serves, with the cause named in the failed
update event (TUF's error class and the role), and the artifact never downloaded.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tuf.api.metadata import Metadata, TargetFile

from tests.support.models import classifier
from tests.support.tuf_repo import Device, TufRepo
from updater.inferctl.main import main
from updater.meta import meta_to_custom


def _refused(device: Device, *needles: str) -> str:
    """Still serving v1, the job failed; the failure message contains every needle."""
    assert device.version == "1"
    assert device.states()[-2:] == ["failed", "idle"], device.states()
    (reason,) = [m for k, m, f in device.events if k == "update" and f["state"] == "failed"]
    for needle in needles:
        assert needle in reason, reason
    assert "\n" not in reason
    return reason


def _resign(tuf: TufRepo, role: str, **signed: Any) -> Metadata[Any]:
    """A new version of ``role`` with ``signed`` fields changed, signed by the role's keys
    (as a holder of the keys would), written where devices fetch it."""
    md = tuf.repo.open(role)
    md.signed.version += 1
    for key, value in signed.items():
        setattr(md.signed, key, value)
    tuf.repo.sign(role, md)
    return md


def _past() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)


@pytest.fixture
def v1_device(tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path) -> Device:
    return update_device(classifier(tmp_path / "v1.onnx", seed=0))


# -- expiry -------------------------------------------------------------------------------------


def test_expired_targets_metadata_is_refused(
    tuf_repo: TufRepo, v1_device: Device, tmp_path: Path
) -> None:
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    _resign(tuf_repo, "targets", expires=_past())
    tuf_repo.repo.publish()  # fresh snapshot and timestamp over the expired targets
    v1_device.check()
    _refused(v1_device, "ExpiredMetadataError", "New targets is expired")
    assert not [r for r in tuf_repo.server.requests if "/targets/" in r]


def test_expired_snapshot_metadata_is_refused(
    tuf_repo: TufRepo, v1_device: Device, tmp_path: Path
) -> None:
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    _resign(tuf_repo, "snapshot", expires=_past())
    tuf_repo.repo.do_timestamp(force=True)  # a fresh timestamp naming the expired snapshot
    v1_device.check()
    _refused(v1_device, "ExpiredMetadataError", "snapshot.json is expired")


def test_expired_root_metadata_is_refused(
    tuf_repo: TufRepo, v1_device: Device, tmp_path: Path
) -> None:
    """A new root, correctly signed, but expired: the newest root must be valid now."""
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    _resign(tuf_repo, "root", expires=_past())
    v1_device.check()
    _refused(v1_device, "ExpiredMetadataError", "root.json is expired")


def test_metadata_expiring_in_the_future_is_accepted(
    tuf_repo: TufRepo, v1_device: Device, tmp_path: Path
) -> None:
    """The premise of the three above: the same re-signing with a future expiry installs."""
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    soon = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=1)
    _resign(tuf_repo, "root", expires=soon)
    _resign(tuf_repo, "targets", expires=soon)
    tuf_repo.repo.publish()
    v1_device.check()
    assert v1_device.version == "2"


# -- thresholds ---------------------------------------------------------------------------------


def test_a_new_root_needs_two_of_the_three_root_keys(
    tuf_repo_factory: Callable[..., TufRepo],
    update_device: Callable[..., Device],
    tmp_path: Path,
) -> None:
    tuf = tuf_repo_factory(keys={"root": 3}, thresholds={"root": 2})
    device = update_device(classifier(tmp_path / "v1.onnx"), repo=tuf)
    tuf.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    keys = tuf.repo.signers("root")
    assert len(keys) == 3 and tuf.repo.root().roles["root"].threshold == 2
    md = tuf.repo.open("root")
    md.signed.version += 1
    md.signatures.clear()
    md.sign(keys[0])  # one signature: what a single stolen root key can do
    data = md.to_bytes()
    for path in (tuf.metadata("2.root.json"), tuf.metadata("root.json")):
        path.write_bytes(data)
    device.check()
    _refused(device, "UnsignedMetadataError", "root")
    # the same root with a second signature is a legitimate rotation
    md.sign(keys[1], append=True)
    tuf.metadata("2.root.json").write_bytes(md.to_bytes())
    device.events.clear()
    device.check()
    assert device.version == "2"
    history = device.state_dir / "update" / "metadata" / "root_history"
    assert sorted(p.name for p in history.iterdir())[-1] == "2.root.json"


# -- golden and reference files must be targets themselves --------------------------------------


def _sign_model_naming(tuf: TufRepo, model: Path, **extra: str) -> str:
    """Publish ``model`` as version 9, its signed metadata naming ``extra`` files (golden,
    reference_stats) that are served but not signed as targets; returns the model's path."""
    md = tuf.repo.open("targets")
    custom = meta_to_custom(tuf.repo.models()[-1][2])
    custom["inferd"].update(version="9", seq=md.signed.version + 1, **extra)
    path = "classifier/9/model.onnx"
    target = TargetFile.from_file(path, str(model), ["sha256"])
    target.unrecognized_fields["custom"] = custom
    md.signed.targets[path] = target
    md.signed.version += 1
    tuf.repo.sign("targets", md)
    served = tuf.repo.targets_dir / "classifier" / "9"
    served.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, served / f"{target.hashes['sha256']}.model.onnx")
    for name in extra.values():  # the file is there to fetch, only its signature is missing
        (served / Path(name).name).write_bytes(b"not signed")
    tuf.repo.publish()
    return path


@pytest.mark.parametrize(
    ("field", "name"),
    [("golden", "classifier/9/golden.npz"), ("reference_stats", "classifier/9/reference.json")],
)
def test_a_golden_or_reference_file_that_is_not_a_signed_target_is_refused(
    tuf_repo: TufRepo, v1_device: Device, tmp_path: Path, field: str, name: str
) -> None:
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    v1_device.check()
    assert v1_device.version == "2"
    path = _sign_model_naming(tuf_repo, classifier(tmp_path / "v9.onnx", seed=9), **{field: name})
    v1_device.events.clear()
    tuf_repo.server.requests.clear()
    v1_device.check()
    assert v1_device.version == "2"
    assert v1_device.states()[-2:] == ["failed", "idle"], v1_device.states()
    (reason,) = [m for k, m, f in v1_device.events if k == "update" and f["state"] == "failed"]
    assert f"{path} names {name}, which is not a target" in reason, reason
    assert not [r for r in tuf_repo.server.requests if "/targets/" in r], "nothing downloaded"


# -- inferctl repo refresh ----------------------------------------------------------------------


def _expiry(tuf: TufRepo, role: str) -> tuple[int, datetime]:
    signed = tuf.repo.open(role).signed
    return signed.version, signed.expires


def test_repo_refresh_re_signs_roles_close_to_expiry_and_devices_accept_them(
    tuf_repo: TufRepo,
    v1_device: Device,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Targets 2 hours from expiry (of 90 days) and snapshot too: ``inferctl repo refresh``
    re-signs both and the timestamp, for their full periods; a device installs through them
    after the old ones would have expired."""
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    near = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=2)
    _resign(tuf_repo, "targets", expires=near)
    tuf_repo.repo.publish()
    _resign(tuf_repo, "snapshot", expires=near)
    tuf_repo.repo.do_timestamp(force=True)
    before = {role: _expiry(tuf_repo, role) for role in ("targets", "snapshot", "timestamp")}
    assert main(["repo", "refresh", str(tuf_repo.repo.path)]) == 0
    assert "re-signed targets, snapshot, timestamp" in capsys.readouterr().out
    now = datetime.now(timezone.utc)
    for role, days in (("targets", 90), ("snapshot", 30), ("timestamp", 1)):
        version, expires = _expiry(tuf_repo, role)
        assert version == before[role][0] + 1, role
        assert abs(expires - (now + timedelta(days=days))) < timedelta(minutes=5), role
    v1_device.check()
    assert v1_device.version == "2"
    # the next refresh, with nothing close to expiry, re-signs the timestamp only
    assert main(["repo", "refresh", str(tuf_repo.repo.path)]) == 0
    assert "re-signed timestamp;" in capsys.readouterr().out
    assert _expiry(tuf_repo, "targets")[0] == before["targets"][0] + 1


def test_repo_refresh_leaves_fresh_roles_alone(
    tuf_repo: TufRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    before = {role: _expiry(tuf_repo, role) for role in ("targets", "snapshot", "timestamp")}
    assert main(["repo", "refresh", str(tuf_repo.repo.path)]) == 0
    assert "re-signed timestamp;" in capsys.readouterr().out
    assert _expiry(tuf_repo, "targets") == before["targets"]
    assert _expiry(tuf_repo, "snapshot") == before["snapshot"]
    assert _expiry(tuf_repo, "timestamp")[0] == before["timestamp"][0] + 1


def test_golden_file_published_by_inferctl_is_a_signed_target(
    tuf_repo: TufRepo, v1_device: Device, tmp_path: Path
) -> None:
    """The counterpart of the refusal above: inferctl signs the golden file as a target."""
    np.savez(tmp_path / "golden.npz", x=np.ones((2, 4), np.float32))
    meta = tuf_repo.publish(
        classifier(tmp_path / "v2.onnx", seed=2), "2", golden=tmp_path / "golden.npz"
    )
    assert meta.golden in tuf_repo.repo.targets().targets
    v1_device.check()
    assert v1_device.version == "2"
    assert v1_device.messages("validation-passed")
