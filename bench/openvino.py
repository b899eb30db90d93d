"""OpenVINO vs CPU: latency per model through inferd's ONNX backend, both in the same run.

ONNX Runtime's OpenVINO build replaces onnxruntime, so the figures come from one process in the
OpenVINO venv (built from requirements/device-openvino.txt, cached under ~/.cache/inferd;
:mod:`tests.support.openvino_env`) that loads each model twice, with ``providers: [openvino,
cpu]`` and ``[cpu]``, one thread each, and times them in alternating rounds
(:mod:`tests.support.openvino_probe`). Models: the demo and the zoo's ONNX models. A model
OpenVINO cannot compile is served by the CPU (the fallback) and its row says so.

Informational rows: no DESIGN target says OpenVINO must be faster on a given CPU (on an AMD or
an old Intel CPU it may not be); the row reports p50 with openvino beside p50 with cpu. Where
the venv cannot be built (no registry) one row says why and the benchmark still finishes.
Usage: python -m bench.openvino [--json] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench._checks import Check, info, report
from tests.support import openvino_env
from tests.support.zoo import ZOO, ZooError, fetch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "models" / "demo.onnx"


def _models(tmp: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The job's models (demo and the zoo's ONNX models) and notes on those left out."""
    from runtime import bundle

    golden = bundle.read_golden(DEMO.with_suffix(".golden.npz"), ["x"], ["probs"])
    cases: list[tuple[str, Path, dict[str, np.ndarray]]] = [("demo", DEMO, golden.inputs)]
    notes = []
    rng = np.random.default_rng(0)
    for model in ZOO:
        if model.runtime != "onnxruntime":
            continue
        try:
            cases.append((model.name, fetch(model), model.make_inputs(rng)))
        except ZooError as err:
            notes.append(f"{model.name}: {err}")
    job = []
    for name, path, feeds in cases:
        npz = tmp / f"{name}.inputs.npz"
        np.savez(npz, **feeds)
        job.append({"name": name, "path": str(path), "feeds": str(npz)})
    return job, notes


def rows(result: dict[str, Any]) -> list[Check]:
    """One info row per model: p50 with openvino (and what served it) beside p50 with cpu."""
    checks = []
    for name, entry in result.items():
        ov, cpu = entry["openvino+cpu"], entry["cpu"]
        ov_p50 = statistics.median(ov["latency_ms"])
        cpu_p50 = statistics.median(cpu["latency_ms"])
        served = "+".join(ov["providers"])
        measured = f"p50 {ov_p50:.3f} ms (speed-up over cpu {cpu_p50 / ov_p50:.2f}x)"
        if served != "openvino+cpu":
            measured += f"; served by {served}: OpenVINO cannot compile it"
        checks.append(
            info(
                f"{name}: latency with providers [openvino, cpu], 1 thread",
                measured,
                f"providers [cpu]: p50 {cpu_p50:.3f} ms; loads {ov['load_s']:.2f} s vs"
                f" {cpu['load_s']:.2f} s",
            )
        )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model and list")
    args = parser.parse_args()
    try:
        openvino_env.python()
    except (ZooError, openvino_env.OpenVinoEnvError) as err:
        check = info("OpenVINO vs CPU latency", f"not measured: {err}", "none")
        return report({"skipped": str(err)}, [check], args.json)
    with tempfile.TemporaryDirectory(prefix="bench-openvino-") as tmp_name:
        tmp = Path(tmp_name)
        models, notes = _models(tmp)
        job = {
            "models": models,
            "providers": [["openvino", "cpu"], ["cpu"]],
            "out": str(tmp / "out"),
            "runs": args.runs,
            "threads": 1,
        }
        (tmp / "job.json").write_text(json.dumps(job))
        done = openvino_env.run(["-m", "tests.support.openvino_probe", str(tmp / "job.json")])
        if done.returncode != 0:
            raise SystemExit(f"the OpenVINO probe failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout)
    results: dict[str, Any] = {
        name: {
            label: {
                "providers": e["providers"],
                "load_s": round(e["load_s"], 4),
                "p50_ms": round(statistics.median(e["latency_ms"]), 4),
                "p90_ms": round(float(np.percentile(e["latency_ms"], 90)), 4),
                "runs": len(e["latency_ms"]),
            }
            for label, e in entry.items()
        }
        for name, entry in result.items()
    }
    if notes:
        results["left_out"] = notes
    return report(results, rows(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
