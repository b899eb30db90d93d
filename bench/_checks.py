"""The rows a benchmark reports and how they are judged: gated rows pass or fail, the rest inform.

A gated row (:func:`gated`) carries ``"pass": bool``, computed from the figure against its
DESIGN section 9 target; ``make bench`` fails when one is false. An informational row
(:func:`info`) is a figure with no target (a throughput, a load): it carries ``"info": true`` and
no ``"pass"``, and is shown as "info", never as a pass. Every row names the baseline measured in
the same run beside its figure.
"""

from __future__ import annotations

import json
from typing import Any

Check = dict[str, Any]

PASS, FAIL, INFO = "pass", "FAIL", "info"


def gated(name: str, target: str, measured: object, baseline: str, ok: bool) -> Check:
    """A row judged against ``target``: ``ok`` is whether ``measured`` meets it."""
    return {
        "name": name,
        "target": target,
        "measured": measured,
        "baseline": baseline,
        "pass": bool(ok),
    }


def info(name: str, measured: object, baseline: str) -> Check:
    """A row that reports a figure and its same-run baseline with no target to meet."""
    return {"name": name, "target": "reported", "measured": measured, "baseline": baseline,
            "info": True}  # fmt: skip


def verdict(check: Check) -> str:
    """``pass``/``FAIL`` for a gated row, ``info`` for an informational one.

    A row that is neither (no boolean ``pass``, not marked ``info``) is a broken benchmark and
    counts as a failure rather than slipping through.
    """
    result = check.get("pass")
    if isinstance(result, bool):
        return PASS if result else FAIL
    if result is None and check.get("info") is True:
        return INFO
    return FAIL


def failed(checks: list[Check]) -> list[Check]:
    """The rows whose verdict is FAIL."""
    return [c for c in checks if verdict(c) == FAIL]


def line(check: Check) -> str:
    """One row for a terminal: verdict, name, figure, target and baseline."""
    return (
        f"{verdict(check):>4}  {check['name']}: {check['measured']}"
        f" (target {check['target']}; baseline {check['baseline']})"
    )


def report(results: dict[str, Any], checks: list[Check], as_json: bool) -> int:
    """Print the benchmark's results (JSON for ``bench.run``, else one line per row).

    Returns the exit code: 1 when a gated row failed, else 0.
    """
    if as_json:
        print(json.dumps({"results": results, "checks": checks}, indent=2))
    else:
        for check in checks:
            print(line(check))
    return 1 if failed(checks) else 0
