"""SIGKILL of a device process at every state of the update machine, then a restart.

Each case runs a real process (tests/support/update_driver.py) that persists its state under a
real state dir, stops dead right after saving the named state, and is killed with SIGKILL. A
second process must resume from the state on disk and end idle, serving the right version;
with two slots, each slot's job resumes from its own state file, and a device upgraded from
the device-wide state file resumes the job it had.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

from tests.support.models import classifier, elementwise, failing

ROOT = Path(__file__).resolve().parents[3]


def _driver(opts: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.update_driver", json.dumps(opts)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _run_until_paused(opts: dict[str, Any]) -> list[str]:
    proc = _driver(opts)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.strip())
        if line.strip() == "PAUSED":
            break
    else:
        proc.wait()
        raise AssertionError(f"driver never reached {opts['pause_at']}: {lines}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return lines


def _run_to_end(opts: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    proc = _driver(opts)
    out, _ = proc.communicate(timeout=60)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, rows
    return rows[-1], rows


MAIN_PATH = ["checking", "downloading", "verifying", "staging", "validating", "activating",
             "trial", "committed"]  # fmt: skip


@pytest.mark.parametrize("state", MAIN_PATH)
def test_sigkill_at_each_state_then_restart_completes_the_update(tuf_repo, tmp_path, state):
    v1 = classifier(tmp_path / "v1.onnx", seed=0)
    np.savez(tmp_path / "golden.npz", x=np.ones((2, 4), np.float32))
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2", golden=tmp_path / "golden.npz")
    opts = {
        "state_dir": str(tmp_path / "state"),
        "url": tuf_repo.url,
        "trusted_root": str(tuf_repo.trusted_root),
        "model": str(v1),
        "pause_at": state,
    }
    _run_until_paused(opts)
    saved = json.loads((tmp_path / "state" / "update" / "jobs" / "classifier.json").read_bytes())
    assert saved["state"] == state, "the state is on disk before its work starts"
    done, rows = _run_to_end({**opts, "pause_at": None})
    assert done["slots"] == {"classifier": ["idle", "2"]}, rows
    boot = next(r["boot"]["classifier"] for r in rows if "boot" in r)
    # after activation the store already points at the new version: the restart boots it
    after_activation = MAIN_PATH.index(state) >= MAIN_PATH.index("trial")
    assert boot == ("2" if after_activation else "1")
    # nothing is left half-done: one version dir, no downloads or temp files
    models = tmp_path / "state" / "models" / "classifier"
    assert [p.name for p in models.iterdir() if p.is_dir()] == ["000002-2"]
    work = tmp_path / "state" / "update"
    assert not list((work / "downloads").iterdir()) and not list((work / "tmp").iterdir())


def test_sigkill_in_failed_then_restart_cleans_up_and_keeps_serving(tuf_repo, tmp_path):
    v1 = classifier(tmp_path / "v1.onnx", seed=0)
    x = np.ones((2, 4), np.float32)
    np.savez(tmp_path / "wrong.npz", x=x, probs=np.full((2, 3), 1 / 3, np.float32))
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2", golden=tmp_path / "wrong.npz")
    opts = {
        "state_dir": str(tmp_path / "state"),
        "url": tuf_repo.url,
        "trusted_root": str(tuf_repo.trusted_root),
        "model": str(v1),
        "pause_at": "failed",
    }
    _run_until_paused(opts)
    done, rows = _run_to_end({**opts, "pause_at": None})
    assert done["slots"] == {"classifier": ["idle", "1"]}, rows
    models = tmp_path / "state" / "models" / "classifier"
    assert not [p for p in models.iterdir() if p.is_dir()], "the failed version is removed"


def test_sigkill_in_rolled_back_then_restart_boots_the_previous_version(tuf_repo, tmp_path):
    v1 = elementwise(tmp_path / "v1.onnx", "Relu", TensorProto.FLOAT, [1, 4])
    tuf_repo.publish(failing(tmp_path / "bad.onnx"), "2")
    opts = {
        "state_dir": str(tmp_path / "state"),
        "url": tuf_repo.url,
        "trusted_root": str(tuf_repo.trusted_root),
        "model": str(v1),
        "pause_at": "rolled_back",
        "bad_traffic": True,
        "trial_window_s": 30,
    }
    lines = _run_until_paused(opts)
    assert any("error rate" in line for line in lines)
    done, rows = _run_to_end({**opts, "pause_at": None, "bad_traffic": False})
    boot = next(r["boot"]["classifier"] for r in rows if "boot" in r)
    assert boot == "1", "the store was pointed back before the models loaded"
    assert done["slots"] == {"classifier": ["idle", "1"]}, rows


def test_sigkill_with_two_slots_mid_job_each_resumes_its_own(tuf_repo, tmp_path):
    """Slot a is in a long trial and slot b stops dead right after saving ``validating`` when
    the process is killed; after the restart a's trial ends and b's job goes on, each from its
    own state file, and both serve version 2."""
    v1 = classifier(tmp_path / "v1.onnx", seed=0)
    for name in ("a", "b"):
        tuf_repo.publish(classifier(tmp_path / f"{name}2.onnx", seed=2), "2", name=name)
    opts = {
        "state_dir": str(tmp_path / "state"),
        "url": tuf_repo.url,
        "trusted_root": str(tuf_repo.trusted_root),
        "model": str(v1),
        "slots": ["a", "b"],
        "pause_at": "b:validating",
        "trial_window_s": 60,
    }
    proc = _driver(opts)
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line.strip())
        a_in_trial = any('"state": "trial", "model": "a"' in x for x in seen)
        if a_in_trial and "PAUSED" in seen:
            break
    else:
        proc.wait()
        raise AssertionError(f"never had a in trial and b paused: {seen}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    jobs = tmp_path / "state" / "update" / "jobs"
    saved = {n: json.loads((jobs / f"{n}.json").read_bytes())["state"] for n in ("a", "b")}
    assert saved == {"a": "trial", "b": "validating"}
    done, rows = _run_to_end({**opts, "pause_at": None, "trial_window_s": 0.5})
    boot = next(r["boot"] for r in rows if "boot" in r)
    assert boot == {"a": "2", "b": "1"}, "a was activated before the kill, b was not"
    assert done["slots"] == {"a": ["idle", "2"], "b": ["idle", "2"]}, rows
    restarts = [r for r in rows if r.get("kind") == "restart"]
    assert [r["model"] for r in restarts] == ["a"], "only a's trial counts the crash"
    b_states = [r["state"] for r in rows if r.get("kind") == "update" and r["model"] == "b"]
    assert b_states[:2] == ["activating", "trial"], "b went on from validation"
    for name in ("a", "b"):
        dirs = [p.name for p in (tmp_path / "state" / "models" / name).iterdir() if p.is_dir()]
        assert dirs == ["000002-2"] if name == "a" else ["000003-2"], (name, dirs)


def test_device_wide_state_file_from_before_slot_jobs_is_resumed(tuf_repo, tmp_path):
    """A device killed mid-job by the upgrade to per-slot jobs: its old ``update/state.json``
    names the job; the new process moves it to the slot's own file and finishes it."""
    v1 = classifier(tmp_path / "v1.onnx", seed=0)
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    opts = {
        "state_dir": str(tmp_path / "state"),
        "url": tuf_repo.url,
        "trusted_root": str(tuf_repo.trusted_root),
        "model": str(v1),
        "pause_at": "staging",
    }
    _run_until_paused(opts)
    # what the device-wide file of the previous release held at this point
    work = tmp_path / "state" / "update"
    rec = json.loads((work / "jobs" / "classifier.json").read_bytes())
    failed, rec["failed"] = rec.pop("failed"), {"classifier": [9]}
    assert failed == []
    rec["last"] = {}
    (work / "state.json").write_text(json.dumps(rec))
    (work / "jobs" / "classifier.json").unlink()
    done, rows = _run_to_end({**opts, "pause_at": None})
    assert done["slots"] == {"classifier": ["idle", "2"]}, rows
    states = [r["state"] for r in rows if r.get("kind") == "update"]
    assert states[0] == "validating", "the job went on after staging"
    assert not (work / "state.json").exists() and (work / "state.json.migrated").exists()
    assert json.loads((work / "jobs" / "classifier.json").read_bytes())["failed"] == [9]
