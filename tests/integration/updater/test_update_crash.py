"""SIGKILL of a device process at every state of the update machine, then a restart.

Each case runs a real process (tests/fixtures/update_driver.py) that persists its state under a
real state dir, stops dead right after saving the named state, and is killed with SIGKILL. A
second process must resume from the state on disk and end idle, serving the right version.
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

from tests.fixtures.models import classifier, elementwise, failing

ROOT = Path(__file__).resolve().parents[3]


def _driver(opts: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.update_driver", json.dumps(opts)],
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
    saved = json.loads((tmp_path / "state" / "update" / "state.json").read_bytes())
    assert saved["state"] == state, "the state is on disk before its work starts"
    done, rows = _run_to_end({**opts, "pause_at": None})
    assert done == {"done": "idle", "serving": "2"}, rows
    boot = next(r["boot"] for r in rows if "boot" in r)
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
    assert done == {"done": "idle", "serving": "1"}, rows
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
    boot = next(r["boot"] for r in rows if "boot" in r)
    assert boot == "1", "the store was pointed back before the models loaded"
    assert done == {"done": "idle", "serving": "1"}, rows
