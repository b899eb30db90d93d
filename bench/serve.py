"""Serving overhead: bare ``session.run`` vs the in-process slot vs HTTP infer over keep-alive.

For the demo model and a heavier generated model, measures in one run, interleaved in rounds so
machine noise hits every path alike:
  bare      onnxruntime.InferenceSession.run with the same options
  inproc    ModelSlot.predict (checks, timing, counting, swap-safe reference)
  http      POST /v2/models/{name}/infer with JSON tensors to a real ``inferd run`` process, one
            keep-alive connection, from a lean client (what curl, wrk or a C/Go client costs)
  http_bin  the same with the binary tensor extension (raw bytes in and out)
  http_lib  the JSON request again through Python's http.client, whose own request building and
            response parsing add about 100 us in the *caller*; reported, not judged
and prints p50/p99 and the overhead against DESIGN section 9:
  in-process <= 1.10x bare + 20 us;  HTTP p50 - bare p50 <= 300 us (JSON and binary).
Usage: python -m bench.serve [--iterations N] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.config import ModelConfig
from agent.slots import ModelSlot
from tests.support import models
from tests.support.daemon import start_daemon

ROOT = Path(__file__).resolve().parents[1]


def percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.array(samples) * 1e6
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


class LeanClient:
    """A keep-alive HTTP/1.1 client that does only what the exchange needs: one prepared
    request per call, the reply read by its Content-Length."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = f"{host}:{port}"  # the API refuses a Host that does not name it

    def prepare(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return head.encode() + b"\r\n" + body

    def send(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(rest) < length:
            rest += self.sock.recv(65536)
        return rest

    def close(self) -> None:
        self.sock.close()


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_model(name: str, path: Path, x: np.ndarray, iterations: int, tmp: Path) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {"x": x}
    slot = ModelSlot(ModelConfig(name=name, path=str(path)))
    slot.swap(slot.load(path, "1"))
    daemon = start_daemon(tmp / name, {"models": [{"name": name, "path": str(path)}]})
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    bin_body = head + x.astype("<f4").tobytes()
    conn = http.client.HTTPConnection(daemon.host, daemon.port)
    lean = LeanClient(daemon.host, daemon.port)
    path = f"/v2/models/{name}/infer"

    def post(payload: bytes, headers: dict[str, str]) -> None:
        conn.request("POST", path, body=payload, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")

    json_headers = {"Content-Type": "application/json"}
    bin_headers = {"Inference-Header-Content-Length": str(len(head))}
    json_req = lean.prepare(path, body, json_headers)
    bin_req = lean.prepare(path, bin_body, bin_headers)

    paths: dict[str, Callable[[], object]] = {
        "bare": lambda: session.run(None, feeds),
        "inproc": lambda: slot.predict(feeds),
        "http": lambda: lean.send(json_req),
        "http_bin": lambda: lean.send(bin_req),
        "http_lib": lambda: post(body, json_headers),
    }
    samples: dict[str, list[float]] = {k: [] for k in paths}
    try:
        for fn in paths.values():
            timed(fn, 50)  # warm caches and the connection
        rounds = 10
        for _ in range(rounds):
            for key, fn in paths.items():
                samples[key] += timed(fn, iterations // rounds)
    finally:
        conn.close()
        lean.close()
        daemon.stop()
        slot.close()
    res: dict[str, float] = {}
    for key, s in samples.items():
        res[f"{key}_p50_us"], res[f"{key}_p99_us"] = percentiles(s)
    res["inproc_ratio_p50"] = res["inproc_p50_us"] / res["bare_p50_us"]
    res["inproc_budget_p50_us"] = 1.10 * res["bare_p50_us"] + 20
    res["inproc_ok"] = res["inproc_p50_us"] <= res["inproc_budget_p50_us"]
    for key in ("http", "http_bin"):
        res[f"{key}_overhead_p50_us"] = res[f"{key}_p50_us"] - res["bare_p50_us"]
        res[f"{key}_ok"] = res[f"{key}_overhead_p50_us"] <= 300
    return res


def checks(results: dict) -> list[dict]:
    """The DESIGN section 9 rows this benchmark measures, for bench/run.py."""
    out = []
    for name, r in results.items():
        out.append(
            {
                "name": f"in-process predict overhead ({name})",
                "target": "<= 1.10x + 20 us",
                "measured": f"p50 {r['inproc_p50_us']:.1f} us ({r['inproc_ratio_p50']:.2f}x)",
                "baseline": f"bare session.run p50 {r['bare_p50_us']:.1f} us",
                "pass": r["inproc_ok"],
            }
        )
        for key, label in (("http", "JSON"), ("http_bin", "binary")):
            out.append(
                {
                    "name": f"HTTP v2 infer overhead, {label} tensors ({name})",
                    "target": "p50 <= 300 us over bare",
                    "measured": f"+{r[key + '_overhead_p50_us']:.1f} us",
                    "baseline": f"bare session.run p50 {r['bare_p50_us']:.1f} us",
                    "pass": r[key + "_ok"],
                }
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print JSON results only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        heavy = models.classifier(tmp / "heavy.onnx", n_features=512, n_classes=256)
        cases = {
            "demo": (
                ROOT / "examples/models/demo.onnx",
                np.load(ROOT / "examples/models/demo.golden.npz")["x"][:1],
            ),
            "heavy": (heavy, np.random.default_rng(0).normal(size=(8, 512)).astype(np.float32)),
        }
        results = {}
        for name, (path, x) in cases.items():
            (tmp / name).mkdir()
            results[name] = bench_model(name, path, x, args.iterations, tmp)
    if args.json:
        print(json.dumps({"results": results, "checks": checks(results)}, indent=2))
        return 0
    print(f"{'model':7} {'path':7} {'p50 us':>9} {'p99 us':>9}")
    for name, r in results.items():
        for key in ("bare", "inproc", "http", "http_bin", "http_lib"):
            print(f"{name:7} {key:7} {r[key + '_p50_us']:9.1f} {r[key + '_p99_us']:9.1f}")
    print()
    for name, r in results.items():
        print(
            f"{name}: in-process p50 {r['inproc_p50_us']:.1f} us"
            f" = {r['inproc_ratio_p50']:.3f}x bare"
            f" (target <= 1.10x + 20 us = {r['inproc_budget_p50_us']:.1f} us):"
            f" {'PASS' if r['inproc_ok'] else 'FAIL'}"
        )
        for key, label in (("http", "HTTP JSON"), ("http_bin", "HTTP binary")):
            print(
                f"{name}: {label} p50 overhead {r[key + '_overhead_p50_us']:.1f} us over bare"
                f" (target <= 300 us): {'PASS' if r[key + '_ok'] else 'FAIL'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
