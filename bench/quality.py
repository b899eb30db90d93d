"""Quality monitoring cost: what the monitor adds to a request, and what its worker keeps up with.

Measured in one run, interleaved in rounds so machine noise hits both paths alike:
  bare      onnxruntime.InferenceSession.run (same options)
  slot      ModelSlot.predict without listeners
  watched   ModelSlot.predict with the QualityMonitor listening (its worker running, drift on)
The check: predict with the monitor stays within DESIGN section 9's in-process budget
(<= 1.10x bare + 20 us). Also printed: worker throughput (predictions/s interpreted, drift-binned
and held for labels) and feedback joins/s.
Usage: python -m bench.quality [--iterations N] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort

from agent.config import ModelConfig
from agent.slots import ModelSlot
from bench._checks import gated, info, report
from telemetry.config import QualityConfig
from telemetry.quality.drift import compute_reference
from telemetry.quality.monitor import QualityMonitor

ROOT = Path(__file__).resolve().parents[1]


def p50_us(samples: list[float]) -> float:
    return float(np.percentile(np.array(samples) * 1e6, 50))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--json", action="store_true", help="print JSON results only")
    args = parser.parse_args()

    path = ROOT / "examples/models/demo.onnx"
    x_train = np.load(ROOT / "examples/models/demo.eval.npz")["x"]
    rows = [{"x": x_train[i : i + 1]} for i in range(len(x_train))]  # real, varied inputs
    feeds = rows[0]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    plain = ModelSlot(ModelConfig(name="plain", path=str(path)))
    plain.swap(plain.load(path, "1"))
    watched = ModelSlot(ModelConfig(name="watched", path=str(path)))
    watched.swap(watched.load(path, "1"))
    monitor = QualityMonitor(
        QualityConfig(publish_interval_s=3600, drift_window=500),
        "bench",
        lambda payload: None,
        queue_size=1_000_000,
    )
    monitor.set_reference("watched", "1", compute_reference({"x": x_train}))
    watched.listeners.append(monitor.listener)
    monitor.start()

    paths = {
        "bare": lambda: session.run(None, feeds),
        "slot": lambda: plain.predict(feeds),
        "watched": lambda: watched.predict(rows[len(times["watched"]) % len(rows)]),
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(100):  # warm-up (the watched path also starts filling its drift window)
        for fn in paths.values():
            fn()
    rounds = 20
    for _ in range(rounds):
        for key, fn in paths.items():
            for _ in range(args.iterations // rounds):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
    monitor.stop()

    # the worker alone: interpret + drift + hold for a label, then the feedback join
    worker = QualityMonitor(
        QualityConfig(publish_interval_s=3600, join_max_pending=100_000, window_count=100_000),
        "bench",
        lambda payload: None,
        queue_size=1_000_000,
    )
    worker.set_reference("watched", "1", compute_reference({"x": x_train}))
    watched.listeners[:] = [worker.listener]
    n = args.iterations
    for i in range(n):
        watched.predict(rows[i % len(rows)], request_id=f"r{i}")
    t = time.perf_counter()
    worker.drain()
    worker_s = time.perf_counter() - t
    bodies = [msgspec.json.encode({"id": f"r{i}", "label": i % 3}) for i in range(n)]
    t = time.perf_counter()
    for body in bodies:
        worker.feedback("watched", body)
    feedback_s = time.perf_counter() - t
    (payload,) = worker.payloads()
    assert payload.samples == n, payload.samples

    bare, slot, mon = p50_us(times["bare"]), p50_us(times["slot"]), p50_us(times["watched"])
    budget = 1.10 * bare + 20.0
    results = {
        "bare_p50_us": bare,
        "slot_p50_us": slot,
        "watched_p50_us": mon,
        "monitor_added_p50_us": mon - slot,
        "watched_ratio_p50": mon / bare,
        "budget_p50_us": budget,
        "ok": mon <= budget,
        "worker_predictions_per_s": n / worker_s,
        "feedback_joins_per_s": n / feedback_s,
    }
    checks = [
        gated(
            "in-process predict overhead with the quality monitor listening (demo)",
            "<= 1.10x + 20 us",
            f"p50 {mon:.1f} us ({mon / bare:.2f}x), monitor +{mon - slot:.1f} us",
            f"bare session.run p50 {bare:.1f} us",
            results["ok"],
        ),
        info(
            "quality worker throughput (interpret, drift, hold for a label)",
            f"{results['worker_predictions_per_s']:.0f} predictions/s",
            f"one thread's slot.predict rate {1e6 / slot:.0f} predictions/s",
        ),
        info(
            "feedback joins/s",
            f"{results['feedback_joins_per_s']:.0f} joins/s",
            f"one thread's slot.predict rate {1e6 / slot:.0f} predictions/s",
        ),
    ]
    return report(results, checks, args.json)


if __name__ == "__main__":
    sys.exit(main())
