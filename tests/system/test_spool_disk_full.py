"""A daemon whose state dir fills up for real (a small tmpfs) while the broker is away: it keeps
serving, says so in one line (no traceback), and every prediction record it had spooled before
the disk filled reaches the broker once space is freed and the broker is back."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.broker import Broker, Capture
from tests.support.daemon import running_daemon
from tests.support.models import classifier
from tests.support.tmpfs import fill
from tests.support.waits import wait_until

DEVICE = "disk-device"


@pytest.fixture
def small_state_dir(tmpfs_factory: Callable[[str, str], Path]) -> Path:
    return tmpfs_factory("state", "4m")


def _spooled_records(state: Path) -> int:
    """Prediction records waiting in the daemon's spool (read-only, from outside)."""
    db = sqlite3.connect(f"file:{state / 'telemetry-spool.sqlite'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COALESCE(SUM(records), 0) FROM stream").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def _infer(daemon, rid: str) -> None:  # type: ignore[no-untyped-def]
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}
    status, body = daemon.infer("classifier", [x], id=rid)
    assert status == 200, body


def test_a_full_disk_keeps_serving_with_one_line_and_loses_no_spooled_record(
    tmp_path: Path, small_state_dir: Path, broker_factory: Callable[..., Broker]
) -> None:
    broker = broker_factory(start=False)  # away until the end: everything is spooled
    config = {
        "device_id": DEVICE,
        "state_dir": str(small_state_dir),
        "models": [{"name": "classifier", "path": str(classifier(tmp_path / "m.onnx"))}],
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port},
        "telemetry": {"prediction_batch_ms": 20, "metrics_interval_s": 3600},
    }
    with running_daemon(tmp_path, config) as daemon:
        for i in range(30):
            _infer(daemon, f"before-{i}")
        assert wait_until(lambda: _spooled_records(small_state_dir) == 30, 20), "30 records spooled"
        filler = fill(small_state_dir)
        for i in range(30):
            _infer(daemon, f"during-{i}")  # serving does not need the disk
        assert wait_until(lambda: "predictions: cannot queue" in daemon.stderr(), 20), (
            "the refusal is logged"
        )
        filler.unlink()
        broker.start()
        capture = Capture(broker.host, broker.port, (f"inferd/{DEVICE}/predictions",))
        try:
            ids: set[str] = set()

            def delivered() -> bool:
                ids.clear()
                for m in capture.on("/predictions"):
                    ids.update(r["request_id"] for r in json.loads(m.payload)["records"])
                return {f"before-{i}" for i in range(30)} <= ids

            assert capture.wait(delivered, timeout=30), sorted(ids)
        finally:
            capture.close()
    log = daemon.stderr()
    assert "Traceback" not in log, log
    refusals = [line for line in log.splitlines() if "predictions: cannot queue" in line]
    assert len(refusals) == 1, refusals
    assert " ERROR " in refusals[0] and "the disk is full" in refusals[0], refusals
