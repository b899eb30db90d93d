"""``inferctl watch`` against a real agent and broker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from telemetry.fleet.watch import Fleet, render_text
from tests.support.broker import Broker, Capture
from tests.support.daemon import start_daemon
from tests.support.mqtt_agent import DEVICE, agent_config, infer

ROOT = Path(__file__).resolve().parents[2]


def watch(b: Broker, *args: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "updater.inferctl",
            "watch",
            "--broker",
            f"{b.host}:{b.port}",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


def test_watch_shows_the_fleet_as_json_and_as_a_table(
    tmp_path: Path,
    broker: Broker,
    capture_factory: Callable[..., Capture],
    model_factory: Callable[..., Path],
) -> None:
    cap = capture_factory(broker, f"inferd/{DEVICE}/metrics")
    cfg = agent_config(model_factory("classifier"), broker, tmp_path / "state")
    run = tmp_path / "run"
    run.mkdir()
    d = start_daemon(run, cfg)
    try:
        for i in range(30):
            infer(d, f"w{i}")
        assert cap.wait(
            lambda: any(json.loads(m.payload)["models"] for m in cap.on("/metrics")), 10
        )
        rows = json.loads(watch(broker, "--json", "--wait", "1.0"))
        text = watch(broker, "--once", "--wait", "1.0")
    finally:
        assert d.stop() == 0
    (row,) = rows
    assert row["device"] == DEVICE and row["online"] is True
    model = row["models"]["clf"]
    assert model["version"] == "1" and model["update_state"] == "idle"
    assert row["cpu_percent"] is not None
    assert DEVICE in text and "clf@1" in text and "yes" in text
    # after the agent stopped, the retained status says offline
    after = json.loads(watch(broker, "--json", "--wait", "0.5"))
    assert after[0]["online"] is False


def test_fleet_ignores_foreign_and_malformed_messages() -> None:
    fleet = Fleet("inferd")
    fleet.feed("inferd/x/status", b"not json")
    fleet.feed("inferd/x/status", b'{"state": "online"}')  # missing fields: not our schema
    fleet.feed("inferd/y/events", b"{}")
    assert fleet.rows() == []
    fleet.feed("inferd/z/status", b'{"state":"offline","schema_version":1,"ts":null,"device":"z"}')
    (row,) = fleet.rows()
    assert row["device"] == "z" and row["online"] is False and row["models"] == {}
    assert "z" in render_text(fleet.rows())
