"""Run every benchmark under bench/ and collect their checks into results.json and results.md.

Each benchmark script accepts ``--json`` and prints ``{"results": {...}, "checks": [...]}``,
a check being ``{"name", "target", "measured", "baseline", "pass"}``: the DESIGN section 9
target, the figure measured, and the baseline measured in the same run. A script may exit 1
when one of its checks fails; its checks are still collected. One that prints no JSON is
listed as failed to run, and then ``run.py`` exits 1.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != "run.py")
    all_checks: list[dict] = []
    results: dict[str, object] = {}
    failed_scripts = []
    durations: dict[str, float] = {}
    began = time.monotonic()
    for script in scripts:
        print(f"== {script.name}", flush=True)
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(script), "--json"], capture_output=True, text=True, check=False
        )
        took = time.monotonic() - start
        durations[script.name] = round(took, 1)
        # a script exits 1 when one of its checks fails: its checks still go in the table
        try:
            data = json.loads(proc.stdout[proc.stdout.index("{") :])
        except ValueError:
            failed_scripts.append(script.name)
            print(f"{script.name} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            continue
        results[script.stem] = data.get("results", {})
        for check in data.get("checks", []):
            check["bench"] = script.name
            all_checks.append(check)
            print(
                f"  {'PASS' if check['pass'] else 'FAIL'}  {check['name']}: {check['measured']}"
                f" (target {check['target']}; baseline {check['baseline']})"
            )
        print(f"  ({took:.0f} s)")
    machine = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "seconds": round(time.monotonic() - began),
        "durations_s": durations,
        "failed_to_run": failed_scripts,
    }
    (HERE / "results.json").write_text(
        json.dumps({"machine": machine, "checks": all_checks, "results": results}, indent=2) + "\n"
    )
    lines = [
        f"Measured {machine['date']} on {machine['cpus']} x {machine['cpu']}, Python"
        f" {machine['python']}; `make bench` took {machine['seconds']} s"
        + (f"; failed to run: {', '.join(failed_scripts)}" if failed_scripts else "")
        + ".",
        "",
        "| benchmark | what | target | measured | baseline (same run) | result |",
        "|---|---|---|---|---|---|",
    ]
    for c in all_checks:
        lines.append(
            f"| {c['bench']} | {c['name']} | {c['target']} | {c['measured']} | {c['baseline']} |"
            f" {'pass' if c['pass'] else '**FAIL**'} |"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    passed = sum(c["pass"] for c in all_checks)
    print(
        f"\n{passed}/{len(all_checks)} targets met; bench/results.json and bench/results.md written"
    )
    if failed_scripts:
        print(f"benchmarks that failed to run: {', '.join(failed_scripts)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
