"""Run inferd's ONNX backend on models with several provider lists, in one process.

``python -m tests.support.openvino_probe JOB.json`` is what the OpenVINO tests and
``bench/openvino.py`` run inside the OpenVINO venv (:mod:`tests.support.openvino_env`), where
the main venv's onnxruntime cannot be. The job names models, their inputs (an npz) and the
provider lists; for each pair the probe loads the model through ``open_backend`` (the daemon's
path: provider options, fallback, warm-up), runs the inputs once and saves the
outputs to ``OUT/<model>.<providers>.npz``, then times ``runs`` runs, the lists taking turns in
rounds so that both see the same machine. It prints one JSON object: per model and list, the
providers the session really used, the backend's warnings, load seconds and run latencies in
ms. Imports no pytest.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import Backend, open_backend
from runtime.options import RuntimeOptions

ROUNDS = 5


class _Warnings(logging.Handler):
    """The backend's warnings (fallbacks), kept for the job's answer."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _label(providers: list[str]) -> str:
    return "+".join(providers)


def probe(job: dict[str, Any]) -> dict[str, Any]:
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    runs = int(job.get("runs", 0))
    result: dict[str, Any] = {}
    for model in job["models"]:
        name = model["name"]
        with np.load(model["feeds"]) as npz:
            feeds = {k: npz[k] for k in npz.files}
        loaded: dict[str, Backend] = {}
        entry: dict[str, Any] = {}
        for providers in job["providers"]:
            label = _label(providers)
            options = RuntimeOptions(
                providers=tuple(providers),
                threads=int(job.get("threads", 1)),
                name=name,
                **job.get("options", {}),
            )
            caught = _Warnings()
            logging.getLogger("runtime").addHandler(caught)
            start = time.perf_counter()
            try:
                backend = open_backend(model["path"], options, out / "cache" / name / label)
            finally:
                logging.getLogger("runtime").removeHandler(caught)
            load_s = time.perf_counter() - start
            outputs = backend.run(feeds)
            np.savez(out / f"{name}.{label}.npz", **outputs)
            loaded[label] = backend
            entry[label] = {
                "providers": list(backend.providers),
                "load_s": load_s,
                "warmup_error": backend.warmup_error,
                "warnings": caught.lines,
                "latency_ms": [],
            }
        per_round = -(-runs // ROUNDS) if runs else 0
        for _ in range(ROUNDS if runs else 0):
            for label, backend in loaded.items():
                times = entry[label]["latency_ms"]
                for _ in range(per_round):
                    t0 = time.perf_counter_ns()
                    backend.run(feeds)
                    times.append((time.perf_counter_ns() - t0) / 1e6)
        for backend in loaded.values():
            backend.close()
        result[name] = entry
    return result


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    sys.stdout.write(json.dumps(probe(job)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
