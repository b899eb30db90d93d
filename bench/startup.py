"""Start-up and memory: idle RSS, RSS per loaded model, time from start to ready.

Measured in one run against baselines taken in the same run:
  idle RSS      ``inferd run`` with no models (MQTT and updates configured) vs a bare python that
                imports numpy + onnxruntime (the floor DESIGN quotes); target <= 65 MB
  per model     RSS growth of the daemon per loaded copy of a ~4 MB model vs the growth of a bare
                onnxruntime session loading the same file; target <= 1.2x
  start->ready  from process start to /v2/health/ready == 200 with the demo model vs a bare python
                that imports onnxruntime and opens the same model; target < 2 s
Usage: python -m bench.startup [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._checks import gated, report
from tests.support import models
from tests.support.daemon import start_daemon
from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[1]

MB = 1024 * 1024


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def bare_python(code: str) -> dict:
    """Run ``code`` in a fresh python; it prints a JSON dict on its last line."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


RSS_SNIPPET = """
import json
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
"""


def daemon_config(tmp: Path, model_paths: list[Path]) -> dict:
    return {
        "models": [{"name": f"m{i}", "path": str(p)} for i, p in enumerate(model_paths)],
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": free_port()},  # nothing listens
        "updates": {"repository_url": "http://127.0.0.1:9/", "trusted_root": str(tmp / "none")},
    }


def settled_rss(pid: int) -> int:
    time.sleep(1.0)  # let background threads finish their first round
    return rss_of(pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model = models.classifier(tmp / "m.onnx", n_features=1024, n_classes=1024)  # 4 MB
        demo = ROOT / "examples" / "models" / "demo.onnx"

        floor = bare_python(
            RSS_SNIPPET + "import numpy, onnxruntime\nprint(json.dumps({'rss': rss()}))"
        )
        res["floor_rss_mb"] = floor["rss"] / MB

        (tmp / "idle").mkdir()
        d = start_daemon(tmp / "idle", daemon_config(tmp, []))
        res["idle_rss_mb"] = settled_rss(d.proc.pid) / MB
        d.stop()

        # Growth from 1 to 1 + extra copies, so the runtime's own import is not counted.
        extra = 3
        rss = {}
        for n in (1, 1 + extra):
            (tmp / f"many{n}").mkdir()
            d = start_daemon(tmp / f"many{n}", daemon_config(tmp, [model] * n))
            rss[n] = settled_rss(d.proc.pid)
            d.stop()
        res["daemon_per_model_mb"] = (rss[1 + extra] - rss[1]) / extra / MB
        bare = bare_python(
            RSS_SNIPPET
            + "import numpy as np, onnxruntime as ort\n"
            + "so = ort.SessionOptions()\n"
            + "so.intra_op_num_threads = 1\n"
            + "so.inter_op_num_threads = 1\n"
            + "feeds = {'x': np.zeros((1, 1024), np.float32)}\n"
            + f"first = ort.InferenceSession({str(model)!r}, so); first.run(None, feeds)\n"
            + "before = rss()\n"
            + f"s = [ort.InferenceSession({str(model)!r}, so) for _ in range({extra})]\n"
            + "for x in s: x.run(None, feeds)\n"
            + f"print(json.dumps({{'growth': (rss() - before) / {extra}}}))"
        )
        res["bare_per_model_mb"] = bare["growth"] / MB
        res["per_model_ratio"] = res["daemon_per_model_mb"] / res["bare_per_model_mb"]

        starts, bares = [], []
        for i in range(3):
            (tmp / f"start{i}").mkdir()
            t = time.monotonic()
            d = start_daemon(tmp / f"start{i}", daemon_config(tmp, [demo]))
            starts.append(time.monotonic() - t)
            d.stop()
            t = time.monotonic()
            bare_python(
                f"import json, onnxruntime as ort\nort.InferenceSession({str(demo)!r})\n"
                "print(json.dumps({}))"
            )
            bares.append(time.monotonic() - t)
        res["start_to_ready_s"] = statistics.median(starts)
        res["bare_start_s"] = statistics.median(bares)

    checks = [
        gated(
            "RSS before any model is loaded",
            "<= 65 MB",
            f"{res['idle_rss_mb']:.1f} MB",
            f"numpy + onnxruntime import {res['floor_rss_mb']:.1f} MB",
            res["idle_rss_mb"] <= 65,
        ),
        gated(
            "RSS growth per loaded model",
            "<= 1.2x bare session",
            f"{res['daemon_per_model_mb']:.1f} MB ({res['per_model_ratio']:.2f}x)",
            f"bare session {res['bare_per_model_mb']:.1f} MB",
            res["per_model_ratio"] <= 1.2,
        ),
        gated(
            "start to ready (demo model)",
            "< 2 s",
            f"{res['start_to_ready_s']:.2f} s",
            f"bare import + session {res['bare_start_s']:.2f} s",
            res["start_to_ready_s"] < 2,
        ),
    ]
    return report(res, checks, args.json)


if __name__ == "__main__":
    sys.exit(main())
