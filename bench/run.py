"""Run every benchmark under bench/ and collect their checks into results.json and results.md.

Each benchmark script accepts ``--json`` and prints ``{"results": {...}, "checks": [...]}``,
a check being ``{"name", "target", "measured", "baseline", "pass"}``: the DESIGN section 9
target, the figure measured, and the baseline measured in the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != "run.py")
    all_checks: list[dict] = []
    results: dict[str, object] = {}
    failed_scripts = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(script), "--json"], capture_output=True, text=True, check=False
        )
        took = time.monotonic() - start
        if proc.returncode != 0:
            failed_scripts.append(script.name)
            print(f"{script.name} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            continue
        data = json.loads(proc.stdout[proc.stdout.index("{") :])
        results[script.stem] = data.get("results", {})
        for check in data.get("checks", []):
            check["bench"] = script.name
            all_checks.append(check)
            print(
                f"  {'PASS' if check['pass'] else 'FAIL'}  {check['name']}: {check['measured']}"
                f" (target {check['target']}; baseline {check['baseline']})"
            )
        print(f"  ({took:.0f} s)")
    (HERE / "results.json").write_text(
        json.dumps({"checks": all_checks, "results": results}, indent=2) + "\n"
    )
    lines = [
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
