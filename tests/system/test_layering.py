"""The device process never loads operator code: checked in a real daemon, not only by the
import contracts (which cannot see imports made by name at run time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.broker import Broker

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "models" / "demo.onnx"

# Run in a fresh interpreter: build the daemon from a config with every part switched on
# (MQTT, signed updates, quality), start it, publish, stop it, then list what was imported.
CHILD = """
import json, sys
from agent.config import parse_config
from agent.app import build_daemon

daemon = build_daemon(parse_config(json.loads(sys.argv[1])))
daemon.start()
try:
    daemon.slots["demo"].predict  # the serving path is there
finally:
    daemon.stop()
print(json.dumps(sorted(sys.modules)))
"""

FORBIDDEN_PREFIXES = (
    "updater.operator",
    "updater.inferctl",
    "telemetry.fleet",
    "tuf.repository",
    "onnx.",
    "rich",
)
FORBIDDEN_EXACT = ("onnx",)


def test_a_running_daemon_loads_no_operator_module(
    tmp_path: Path, broker: Broker, tuf_repo
) -> None:
    config = {
        "device_id": "layering",
        "state_dir": str(tmp_path / "state"),
        "models": [{"name": "demo", "path": str(DEMO)}],
        "api": {"listen": "127.0.0.1:0"},
        "mqtt": {"host": broker.host, "port": broker.port},
        "updates": {
            "repository_url": tuf_repo.url,
            "trusted_root": str(tuf_repo.trusted_root),
        },
    }
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert "agent.daemon" in modules and "updater.device.client" in modules  # it really ran
    loaded = [m for m in modules if m.startswith(FORBIDDEN_PREFIXES) or m in FORBIDDEN_EXACT]
    assert loaded == [], f"the device process imported operator-side modules: {loaded}"
