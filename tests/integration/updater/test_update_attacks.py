"""Attacks and faults on the update path: each must leave the current model serving and report.

The repository is real (signed by OperatorRepository, served over HTTP); attacks are what an
attacker controlling the mirror or the network can do without the keys: replace files, replay
old ones, serve endless or slow data, sign with keys the device does not trust.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.api.serialization.json import JSONSerializer

from tests.support.models import classifier
from tests.support.net import free_port
from tests.support.tuf_repo import Device, TufRepo
from updater.meta import meta_to_custom


def _assert_refused(device: Device, needle: str) -> None:
    """Still serving v1; the failure was an event naming the cause."""
    assert device.version == "1"
    assert device.states()[-2:] == ["failed", "idle"], device.states()
    failed = [m for k, m, f in device.events if k == "update" and f["state"] == "failed"]
    assert any(needle in m for m in failed), failed
    x = np.zeros((1, 4), np.float32)
    assert device.predict(x)["probs"].shape == (1, 3)


@pytest.fixture
def v1_device(tuf_repo: TufRepo, update_device, tmp_path: Path) -> Device:
    return update_device(classifier(tmp_path / "v1.onnx", seed=0))


def _write(md: Metadata, *paths: Path) -> None:
    data = md.to_bytes(JSONSerializer(compact=False))
    for p in paths:
        p.write_bytes(data)


def test_tampered_artifact(tuf_repo, v1_device, tmp_path):
    meta = tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    served = tuf_repo.target_file(meta)
    data = bytearray(served.read_bytes())
    data[-10] ^= 0xFF
    served.write_bytes(bytes(data))
    v1_device.check()
    _assert_refused(v1_device, "LengthOrHashMismatchError")


def test_artifact_longer_than_signed(tuf_repo, v1_device, tmp_path):
    meta = tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    served = tuf_repo.target_file(meta)
    served.write_bytes(served.read_bytes() + b"\0" * 100)
    v1_device.check()
    _assert_refused(v1_device, "DownloadLengthMismatchError")


def test_endless_data_is_cut_at_the_signed_length(tuf_repo, v1_device, tmp_path):
    meta = tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    tuf_repo.server.faults[tuf_repo.target_file(meta).name] = "endless"
    v1_device.check()
    _assert_refused(v1_device, "DownloadLengthMismatchError")


def test_endless_metadata_is_cut_too(tuf_repo, v1_device):
    tuf_repo.server.faults["/metadata/timestamp.json"] = "endless"
    v1_device.check()
    _assert_refused(v1_device, "DownloadLengthMismatchError")


def test_artifact_not_in_targets_is_never_fetched(tuf_repo, v1_device, tmp_path):
    # a file planted on the mirror, next to real ones, that no signed metadata names
    evil = tuf_repo.repo.targets_dir / "classifier" / "9"
    evil.mkdir(parents=True)
    shutil.copyfile(classifier(tmp_path / "evil.onnx", seed=9), evil / "model.onnx")
    v1_device.check()
    assert v1_device.version == "1"
    assert v1_device.states() == ["checking", "idle"]
    assert not [r for r in tuf_repo.server.requests if "/targets/" in r]
    client = v1_device.updater.client
    assert not [o for o in client.check(["classifier"], []) if o.path.startswith("classifier/9")]


def test_oversized_target_is_refused_before_download(tuf_repo, update_device, tmp_path):
    device = update_device(classifier(tmp_path / "v1.onnx"), max_download_bytes=100)
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    device.check()
    _assert_refused(device, "over updates.max_download_bytes")
    assert not [r for r in tuf_repo.server.requests if "/targets/" in r]


def test_rollback_to_older_timestamp(tuf_repo, v1_device, tmp_path):
    """Replay an older timestamp after the device has seen a newer one."""
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    v1_device.check()
    old = tuf_repo.metadata("timestamp.json").read_bytes()
    tuf_repo.publish(classifier(tmp_path / "v3.onnx", seed=3), "3")
    v1_device.check()
    assert v1_device.version == "3"
    tuf_repo.metadata("timestamp.json").write_bytes(old)
    v1_device.events.clear()
    v1_device.check()
    assert v1_device.version == "3"
    failed = [m for k, m, f in v1_device.events if k == "update" and f["state"] == "failed"]
    assert any("BadVersionNumberError" in m for m in failed), failed


@pytest.mark.parametrize("role", ["snapshot", "targets"])
def test_rollback_to_older_snapshot_or_targets(tuf_repo, v1_device, tmp_path, role):
    """The signed timestamp/snapshot name version N; the mirror answers with N-1's content."""
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    v1_device.check()
    assert v1_device.version == "2"
    old = tuf_repo.metadata(f"{role}.json").read_bytes()
    tuf_repo.publish(classifier(tmp_path / "v3.onnx", seed=3), "3")
    current = Metadata.from_file(str(tuf_repo.metadata(f"{role}.json"))).signed.version
    assert Metadata.from_bytes(old).signed.version < current
    tuf_repo.metadata(f"{current}.{role}.json").write_bytes(old)
    v1_device.events.clear()
    v1_device.check()
    assert v1_device.version == "2"
    failed = [m for k, m, f in v1_device.events if k == "update" and f["state"] == "failed"]
    assert any("BadVersionNumberError" in m for m in failed), failed


def test_mix_and_match_of_metadata(tuf_repo, v1_device, tmp_path):
    """Targets from one repository state served with a snapshot from another."""
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    md = tuf_repo.metadata
    targets_v2 = md("targets.json").read_bytes()
    tuf_repo.publish(classifier(tmp_path / "v3.onnx", seed=3), "3")
    current = Metadata.from_file(str(md("targets.json"))).signed.version
    md(f"{current}.targets.json").write_bytes(targets_v2)
    v1_device.check()
    _assert_refused(v1_device, "BadVersionNumberError")


def test_expired_timestamp_freeze_attack(tuf_repo, v1_device, tmp_path):
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    tuf_repo.repo.refresh(timestamp_expires=datetime.now(timezone.utc) - timedelta(hours=1))
    v1_device.check()
    _assert_refused(v1_device, "ExpiredMetadataError")


def _forge_targets(tuf_repo: TufRepo, model: Path, signers: list) -> None:
    """A new targets version naming an evil model, signed by ``signers`` only; snapshot and
    timestamp are then signed with the real online keys (the role separation TUF relies on)."""
    md = tuf_repo.repo.open("targets")
    target = TargetFile.from_file("classifier/66/evil.onnx", str(model), ["sha256"])
    custom = meta_to_custom(tuf_repo.repo.models()[-1][2])
    custom["inferd"]["version"], custom["inferd"]["seq"] = "66", 99
    target.unrecognized_fields["custom"] = custom
    md.signed.targets[target.path] = target
    md.signed.version += 1
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    v = md.signed.version
    _write(md, tuf_repo.metadata(f"{v}.targets.json"), tuf_repo.metadata("targets.json"))
    dest = tuf_repo.repo.targets_dir / "classifier" / "66"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, dest / f"{target.hashes['sha256']}.evil.onnx")
    tuf_repo.repo.publish()


def test_metadata_signed_by_untrusted_key(tuf_repo, v1_device, tmp_path):
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    _forge_targets(
        tuf_repo, classifier(tmp_path / "evil.onnx", seed=6), [CryptoSigner.generate_ed25519()]
    )
    v1_device.check()
    _assert_refused(v1_device, "UnsignedMetadataError")


def test_threshold_not_met(tmp_path, tuf_repo_factory, update_device):
    tuf = tuf_repo_factory(keys={"targets": 2}, thresholds={"targets": 2})
    repo = tuf.repo
    device = update_device(classifier(tmp_path / "v1.onnx"), repo=tuf)
    tuf.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    device.check()
    assert device.version == "2", "two of two signatures: accepted"
    one_key = repo.signers("targets")[:1]
    _forge_targets(tuf, classifier(tmp_path / "evil.onnx", seed=6), one_key)
    device.events.clear()
    device.check()
    assert device.version == "2"
    failed = [m for k, m, f in device.events if k == "update" and f["state"] == "failed"]
    assert any("UnsignedMetadataError" in m for m in failed), failed


def test_root_rotation_accepted_when_correctly_signed(tuf_repo, v1_device, tmp_path):
    tuf_repo.repo.rotate_key("root")
    tuf_repo.repo.rotate_key("targets")
    tuf_repo.repo.rotate_key("timestamp")
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    v1_device.check()
    assert v1_device.version == "2"
    cache = v1_device.state_dir / "update" / "metadata" / "root_history"
    assert sorted(p.name for p in cache.iterdir())[-1] == "4.root.json"


def test_root_rotation_not_signed_by_the_old_root_is_rejected(tuf_repo, v1_device, tmp_path):
    repo = tuf_repo.repo
    new_root_key = CryptoSigner.generate_ed25519()
    md = repo.open("root")
    root: Root = md.signed
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    root.add_key(new_root_key.public_key, "root")
    root.version += 1
    md.signatures.clear()
    md.sign(new_root_key)  # only the new key: the device's trusted root never approved it
    _write(md, tuf_repo.metadata(f"{root.version}.root.json"))
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    v1_device.check()
    _assert_refused(v1_device, "UnsignedMetadataError")


def test_repository_unreachable(tuf_repo, update_device, tmp_path):
    device = update_device(classifier(tmp_path / "v1.onnx"), url=f"http://127.0.0.1:{free_port()}/")
    device.check()
    _assert_refused(device, "update check")
    assert [
        f["level"] for k, _, f in device.events if k == "update" and f["state"] == "failed"
    ] == ["warning"]


def test_disk_full_while_downloading(tmpfs_factory, tuf_repo, update_device, tmp_path):
    state = tmpfs_factory("small-state", "512k")
    device = update_device(classifier(tmp_path / "v1.onnx", n_features=4), state_dir=state)
    big = classifier(tmp_path / "big.onnx", n_features=4, n_classes=3)
    # a big model: pad with an unused 1 MB initializer so it cannot fit in 512 KB
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(big))
    m.graph.initializer.append(numpy_helper.from_array(np.ones(256 * 1024, np.float32), "pad"))
    onnx.save(m, str(big))
    tuf_repo.publish(big, "2")
    device.check()
    _assert_refused(device, "No space left on device")
    work = state / "update"
    assert not [p for d in ("downloads", "tmp") for p in (work / d).iterdir()]
    # once space is freed, the next update installs
    tuf_repo.publish(classifier(tmp_path / "v3.onnx", seed=3), "3")
    device.check()
    assert device.version == "3"


def _files(root: Path, skip: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and skip not in p.parents
    }


def _sign_with_online_key(tuf_repo: TufRepo, model: Path, **changes: object) -> str:
    """What a holder of the online targets key can publish without inferctl's checks: a new
    targets version naming ``model`` with ``changes`` in its signed metadata, written with
    python-tuf directly, its artifact put where the device fetches it. Returns its path."""
    md = tuf_repo.repo.open("targets")
    custom = meta_to_custom(tuf_repo.repo.models()[-1][2])
    fields = custom["inferd"]
    fields["seq"] = md.signed.version + 1
    fields.update(changes)
    path = f"{fields['name']}/{fields['version']}/evil.onnx"
    target = TargetFile.from_file(path, str(model), ["sha256"])
    target.unrecognized_fields["custom"] = custom
    md.signed.targets[path] = target
    md.signed.version += 1
    md.signatures.clear()
    for signer in tuf_repo.repo.signers("targets"):
        md.sign(signer, append=True)
    v = md.signed.version
    _write(md, tuf_repo.metadata(f"{v}.targets.json"), tuf_repo.metadata("targets.json"))
    served = tuf_repo.repo.targets_dir / f"{fields['name']}/{fields['version']}"
    served.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, served / f"{target.hashes['sha256']}.evil.onnx")
    tuf_repo.repo.publish()
    return path


def test_version_naming_a_path_outside_the_store_is_refused(tuf_repo, update_device, tmp_path):
    """Issue 13: a version ``x/../../../../escaped`` signed with the online key. The store would
    build ``models/classifier/<seq>-x/../../../../escaped``, outside the state dir, and delete
    what is there first. The device applies inferctl's rule to signed metadata and refuses."""
    home = tmp_path / "device"
    state = home / "state"
    device = update_device(classifier(tmp_path / "v1.onnx", seed=0), state_dir=state)
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    device.check()
    assert device.version == "2"
    # what the hostile folder name resolves to, with a file in it that must survive
    escaped = (state / "models" / "classifier" / "000004-x/../../../../escaped").resolve()
    assert escaped == home / "escaped"
    escaped.mkdir()
    (escaped / "precious.txt").write_text("do not delete")
    outside = _files(home, skip=state)
    path = _sign_with_online_key(
        tuf_repo, classifier(tmp_path / "evil.onnx", seed=6), version="x/../../../../escaped"
    )
    device.events.clear()
    device.check()
    assert device.version == "2"
    assert device.states()[-2:] == ["failed", "idle"], device.states()
    (reason,) = [m for k, m, f in device.events if k == "update" and f["state"] == "failed"]
    assert f"{path}: version 'x/../../../../escaped' must be 1-64 letters" in reason
    assert _files(home, skip=state) == outside, "nothing outside the state dir changed"
    assert not [r for r in tuf_repo.server.requests if "evil" in r], "never downloaded"
    assert [p.name for p in (state / "models" / "classifier").iterdir() if p.is_dir()] == [
        "000002-2"
    ]
    # once the operator removes the forged target, updates flow again
    with tuf_repo.repo.edit_targets() as targets:
        del targets.targets[path]
    tuf_repo.repo.publish()
    tuf_repo.publish(classifier(tmp_path / "v3.onnx", seed=3), "3")
    device.check()
    assert device.version == "3"


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"name": "../../escaped"}, "model name '../../escaped' must be"),
        ({"version": "2\n"}, "version '2\\n' must be"),
        ({"version": ".."}, "version '..' must be"),
        ({"seq": 0}, "seq 0 is outside"),
        ({"seq": 10**6}, "seq 1000000 is outside"),
        ({"golden": "classifier/other/golden.npz"}, "golden target"),
        ({"groups": ["a/b"]}, "group 'a/b' must be"),
    ],
)
def test_signed_metadata_inferctl_would_refuse_is_refused(
    tuf_repo, v1_device, tmp_path, changes, needle
):
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    _sign_with_online_key(tuf_repo, classifier(tmp_path / "evil.onnx", seed=6), **changes)
    v1_device.check()
    _assert_refused(v1_device, needle)
    assert not [r for r in tuf_repo.server.requests if "/targets/" in r]
