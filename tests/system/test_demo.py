"""The README's demo, run end to end as a newcomer would (minus the set-up script)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_runs_end_to_end(tmp_path: Path, broker: str) -> None:
    """With Debian's mosquitto, and with the pure-Python amqtt (MQTT 3.1.1) used where
    mosquitto cannot be installed."""
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "demo.py"),
            "--state",
            str(tmp_path / "demo"),
            "--requests",
            "50",
            "--private-broker",  # nothing retained is left on a shared broker
            broker,
        ],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/bin"},
    )
    out = res.stdout
    assert res.returncode == 0, f"{out[-3000:]}\n{res.stderr[-3000:]}"
    assert "matches the golden output" in out
    assert re.search(r"operator console: http://127\.0\.0\.1:\d+/", out), "no console URL"
    assert re.search(r"the console \(.*\) shows demo-device: online True, classifier 2", out)
    for leaf in ("status", "metrics", "predictions", "events"):
        assert re.search(rf"inferd/demo-device/{leaf}: \{{", out), f"no {leaf} payload shown"
    assert "trial -> committed" in out
    assert re.search(r"failed requests throughout: 0\b", out)
    assert re.search(r"demo-device\s+online\s+classifier\s+2\s+committed", out)
    serving = float(re.search(r"version 2 serving ([\d.]+) s after the push", out).group(1))
    assert serving < 10
