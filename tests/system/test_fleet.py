"""A small fleet (20 real agents in 2 processes) through bench/fleet.py: a wave to every agent,
then a staged rollout that 10 % of them fail, which must halt before it reaches everyone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_fleet_wave_and_a_halted_staged_rollout():
    out = subprocess.run(
        [sys.executable, "bench/fleet.py", "--agents", "20", "--procs", "2", "--idle-s", "3",
         "--after-halt-s", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(out.stdout)
    r = data["results"]
    assert all(c["pass"] for c in data["checks"]), data["checks"]
    wave = r["wave"]
    assert wave["served"] == 20 and wave["t50_s"] <= wave["t95_s"] <= wave["t100_s"]
    # every agent read the metadata over HTTP and fetched the artifact once
    assert wave["repo_target_requests"] == 20 and wave["repo_metadata_requests"] >= 3 * 20
    assert r["idle"]["by_topic_per_device_per_min"]["predictions"] > 0
    staged = r["staged"]
    assert staged["faulty_agents"] == 2
    assert staged["halted_at_percent"] is not None and staged["halted_at_percent"] < 100
    assert staged["failed"] >= 1 and staged["failure_ratio"] > 0.05
    # who was not in the rollout never downloaded it
    assert staged["artifact_downloads"] <= staged["attempted"] <= staged["joined"] < 20
    assert staged["never_downloaded"] >= 20 - staged["joined"]
