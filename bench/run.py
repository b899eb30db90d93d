"""Run every benchmark under bench/ and collect their rows into results.json and results.md.

Each benchmark is a module run as ``python -m bench.X --json`` that prints
``{"results": {...}, "checks": [...]}``, a check being ``{"name", "target", "measured",
"baseline"}`` with ``"pass": bool`` when it is gated by a DESIGN section 9 target, or
``"info": true`` when it only reports a figure (see ``bench/_checks.py``). ``make bench`` exits 1
when any gated row failed or a benchmark did not run to the end (no JSON, or a non-zero exit
with no failed row to explain it); its rows are collected either way.
Usage: python -m bench.run [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._checks import FAIL, Check, failed, line, verdict

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def benchmarks() -> list[str]:
    """The benchmark modules: every ``bench/*.py`` but this runner, the private helpers and the
    opt-in ones (peers installs another server: ``make bench-peers``)."""
    return sorted(
        p.stem
        for p in HERE.glob("*.py")
        if p.stem not in ("run", "peers", "check_gpu") and not p.stem.startswith("_")
    )


def _cpu_model() -> str:
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def run_one(name: str) -> tuple[dict[str, Any] | None, int, str]:
    """(the benchmark's JSON or None, its exit code, the tail of its stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        data = json.loads(proc.stdout[proc.stdout.index("{") :])
    except ValueError:
        data = None
    return data, proc.returncode, proc.stderr[-2000:]


def did_not_finish(data: dict[str, Any] | None, code: int, checks: list[Check]) -> bool:
    """No JSON, or a non-zero exit that no failed row explains (a crash after printing)."""
    return data is None or (code != 0 and not failed(checks))


def exit_code(checks: list[Check], unfinished: list[str]) -> int:
    """1 when a gated row failed or a benchmark did not finish, else 0."""
    return 1 if failed(checks) or unfinished else 0


def write_tables(machine: dict[str, Any], checks: list[Check], results: dict[str, Any]) -> None:
    for c in checks:
        c["result"] = verdict(c)
    (HERE / "results.json").write_text(
        json.dumps({"machine": machine, "checks": checks, "results": results}, indent=2) + "\n"
    )
    unfinished = machine["did_not_finish"]
    lines = [
        f"Measured {machine['date']} on {machine['cpus']} x {machine['cpu']}, Python"
        f" {machine['python']}; `make bench` took {machine['seconds']} s"
        + (f"; did not finish: {', '.join(unfinished)}" if unfinished else "")
        + ".",
        "",
        "| benchmark | what | target | measured | baseline (same run) | result |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        shown = "**FAIL**" if c["result"] == FAIL else c["result"]
        lines.append(
            f"| {c['bench']} | {c['name']} | {c['target']} | {c['measured']} | {c['baseline']} |"
            f" {shown} |"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def merge_into_results(
    bench: str,
    rows: list[Check],
    results: Callable[[Any], Any],
    same_names_only: bool = False,
) -> None:
    """Merge one benchmark's rows into results.json and results.md, keeping the others'.

    For a benchmark run on its own (``bench.peers``, ``bench.fleet --devices``): the machine line
    is kept (or written now if there is none), this benchmark's earlier rows are replaced (with
    ``same_names_only``, only those named as a new row), and its results become
    ``results(earlier)``, ``earlier`` being its results as recorded (None when there are none).
    """
    file = HERE / "results.json"
    try:
        old = json.loads(file.read_text())
    except (OSError, ValueError):
        old = {}
    machine = old.get("machine") or {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": sys.version.split()[0],
        "seconds": 0,
        "did_not_finish": [],
    }
    names = {c["name"] for c in rows}
    kept = [
        c for c in old.get("checks", [])
        if c.get("bench") != bench or (same_names_only and c["name"] not in names)
    ]  # fmt: skip
    for c in rows:
        c["bench"] = bench
    merged = old.get("results", {})
    merged[bench] = results(merged.get(bench))
    write_tables(machine, kept + rows, merged)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    args = parser.parse_args()
    names = benchmarks()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"no benchmark {', '.join(unknown)}; there are {', '.join(names)}")
        names = [n for n in names if n in args.only]
    all_checks: list[Check] = []
    results: dict[str, Any] = {}
    unfinished: list[str] = []
    durations: dict[str, float] = {}
    began = time.monotonic()
    for name in names:
        print(f"== bench.{name}", flush=True)
        start = time.monotonic()
        data, code, stderr = run_one(name)
        took = time.monotonic() - start
        durations[name] = round(took, 1)
        checks: list[Check] = list(data.get("checks", [])) if data else []
        for check in checks:
            check["bench"] = name
            print(f"  {line(check)}")
        all_checks.extend(checks)
        if data is not None:
            results[name] = data.get("results", {})
        if did_not_finish(data, code, checks):
            unfinished.append(name)
            print(f"  bench.{name} did not finish (exit {code}):\n{stderr}")
        print(f"  ({took:.0f} s)", flush=True)
    machine = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "seconds": round(time.monotonic() - began),
        "durations_s": durations,
        "did_not_finish": unfinished,
    }
    write_tables(machine, all_checks, results)
    bad = failed(all_checks)
    gated = [c for c in all_checks if c["result"] != "info"]
    print(
        f"\n{len(gated) - len(bad)}/{len(gated)} gated targets met"
        f" ({len(all_checks) - len(gated)} informational rows);"
        " bench/results.json and bench/results.md written"
    )
    for c in bad:
        print(f"FAILED  bench.{c['bench']}: {c['name']}: {c['measured']} (target {c['target']})")
    if unfinished:
        print(f"benchmarks that did not finish: {', '.join(unfinished)}")
    return exit_code(all_checks, unfinished)


if __name__ == "__main__":
    sys.exit(main())
