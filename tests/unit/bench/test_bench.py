"""The bench's judging, not its figures: rows gate ``make bench`` and report honestly.

The figures themselves are measured by ``make bench`` (never by a test: wall-clock ratios on a
loaded machine are not a unit test's business). What is checked here is what would let a failed
target slip through: a row's verdict, the runner's exit code, the fleet's percentile arithmetic
and its rows, and that the shared builders can be imported by ``python -m bench.X`` without
pytest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bench._checks import FAIL, INFO, PASS, failed, gated, info, report, verdict
from bench.fleet import checks as fleet_checks
from bench.fleet import peak_per_s, percentile_time
from bench.run import benchmarks, did_not_finish, exit_code

ROOT = Path(__file__).resolve().parents[3]


def test_a_gated_row_passes_or_fails_and_an_informational_one_is_only_info() -> None:
    assert verdict(gated("p99", "<= 2x", "1.5x", "1 ms", ok=True)) == PASS
    assert verdict(gated("p99", "<= 2x", "2.5x", "1 ms", ok=False)) == FAIL
    row = info("sample cost", 12.0, "bare psutil 3 us")
    assert verdict(row) == INFO and "pass" not in row


@pytest.mark.parametrize(
    "row",
    [
        {"name": "no verdict at all", "target": "0", "measured": 1, "baseline": "-"},
        {"name": "truthy, not a bool", "target": "0", "measured": 1, "baseline": "-", "pass": 1},
        {"name": "both", "target": "0", "measured": 1, "baseline": "-", "pass": None, "info": 1},
    ],
)
def test_a_row_that_is_neither_gated_nor_informational_counts_as_failed(row) -> None:
    assert verdict(row) == FAIL and failed([row]) == [row]


def test_a_benchmark_exits_non_zero_when_one_gated_row_failed(capsys) -> None:
    ok = gated("a", "0", 0, "-", ok=True)
    bad = gated("b", "0", 3, "-", ok=False)
    note = info("c", 1, "-")
    assert report({}, [ok, note], as_json=False) == 0
    assert report({}, [ok, bad, note], as_json=False) == 1
    out = capsys.readouterr().out
    assert "FAIL  b: 3" in out and "info  c: 1" in out


def test_make_bench_fails_on_a_failed_row_or_a_benchmark_that_did_not_finish() -> None:
    ok = gated("a", "0", 0, "-", ok=True)
    bad = gated("b", "0", 3, "-", ok=False)
    assert exit_code([ok, info("c", 1, "-")], []) == 0
    assert exit_code([ok, bad], []) == 1
    assert exit_code([ok], ["telemetry"]) == 1
    # no JSON; or a non-zero exit that no failed row explains (a crash after its rows)
    assert did_not_finish(None, 0, [])
    assert did_not_finish({"checks": [ok]}, 1, [ok])
    assert not did_not_finish({"checks": [bad]}, 1, [bad])
    assert not did_not_finish({"checks": [ok]}, 0, [ok])


def test_the_runner_finds_every_benchmark_and_no_helper() -> None:
    names = benchmarks()
    assert {"fleet", "quality", "serve", "startup", "telemetry", "update"} <= set(names)
    assert "run" not in names and not [n for n in names if n.startswith("_")]


def test_percentile_time_is_when_that_share_of_the_fleet_had_arrived() -> None:
    times = [0.5, 0.7, 0.9, 1.4]  # seconds from the push, sorted
    assert percentile_time(times, 4, 50) == 0.7
    assert percentile_time(times, 4, 95) == 1.4  # 95 % of 4 agents is all 4
    assert percentile_time(times, 5, 100) is None  # the fifth never arrived
    assert percentile_time(times, 5, 80) == 1.4


def test_peak_per_s_counts_the_busiest_whole_second() -> None:
    assert peak_per_s([]) == 0.0
    assert peak_per_s([10.1, 10.5, 10.9, 11.2, 12.0, 12.5]) == 3.0


def fleet_result(served: int, halted_at: int | None, downloads: int) -> dict:
    wave = {
        "served": served, "t50_s": 1.0, "t95_s": 2.0, "t100_s": 3.0 if served == 20 else None,
        "broker_msgs_per_device": 9.0, "repo_requests_per_device": 4.0,
        "broker_msgs_peak_per_s": 50.0, "repo_requests_peak_per_s": 30.0,
    }  # fmt: skip
    staged = {
        "halted_at_percent": halted_at, "failed": 1, "attempted": 2, "joined": 2,
        "reaction_s": 0.4, "faulty_agents": 2, "artifact_downloads": downloads,
        "never_downloaded": 20 - downloads,
    }  # fmt: skip
    idle = {"msgs_per_device_per_min": 8.0, "bytes_per_device_per_min": 4096.0,
            "broker_msgs_per_s": 2.7, "repo_requests": 0}  # fmt: skip
    return {"agents": 20, "wave": wave, "staged": staged, "idle": idle,
            "solo": {"t100_s": 0.8}}  # fmt: skip


ARGS = argparse.Namespace(timeout=60.0, fail_ratio=0.1, halt_ratio=0.05)


def test_fleet_rows_pass_when_the_wave_completes_and_the_rollout_halts_early() -> None:
    rows = fleet_checks(fleet_result(served=20, halted_at=10, downloads=2), ARGS)
    assert [verdict(r) for r in rows] == [PASS, PASS, PASS, INFO, INFO]


@pytest.mark.parametrize(
    ("served", "halted_at", "downloads", "failing_row"),
    [
        (19, 10, 2, 0),  # one agent never served the new version
        (20, 10, 3, 1),  # a device outside the rollout downloaded the artifact
        (20, None, 2, 2),  # the rollout never halted
        (20, 100, 2, 2),  # ... or only once it had reached everyone
    ],
)
def test_fleet_rows_fail_on_each_broken_promise(served, halted_at, downloads, failing_row) -> None:
    rows = fleet_checks(fleet_result(served, halted_at, downloads), ARGS)
    assert [i for i, r in enumerate(rows) if verdict(r) == FAIL] == [failing_row]


def test_bench_and_the_shared_builders_import_without_pytest() -> None:
    code = (
        "import sys\n"
        "import bench.fleet, bench.quality, bench.run, bench.serve, bench.startup\n"
        "import bench.telemetry, bench.update\n"
        "import tests.support.broker, tests.support.daemon, tests.support.lifecycle\n"
        "import tests.support.models, tests.support.pki, tests.support.sdnotify\n"
        "import tests.support.tflite_models, tests.support.tuf_repo\n"
        "loaded = sorted(m for m in sys.modules if m == 'pytest' or m.startswith('_pytest'))\n"
        "assert not loaded, loaded\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
