"""Dynamic batching: 8 concurrent HTTP clients on a classifier-sized model, batching on vs off.

One ``inferd run`` process serves the same MLP file twice: slot ``mlp`` unbatched (the default)
and slot ``mlp_batched`` with ``max_batch: 8``. Eight client threads, each on its own keep-alive
connection, send one-row JSON infer requests back to back; rounds alternate between the two
slots so machine noise hits both alike. Reported per slot: throughput (requests/s over the
rounds' wall time) and client-side p50/p99 latency. Gated (DESIGN section 9): batched
throughput above unbatched at no worse p99. Every client checks that its batched answer equals
its unbatched one before the clock starts.

The models are 2-layer MLPs (MatMul+Add+Relu, MatMul+Add, Softmax) built here with onnx.helper.
Gated: 1024 -> 1024 -> 10 (4 MB of weights), whose batch-1 run (~0.5 ms here on one thread, a
batch of 8 ~0.8 ms) is the larger part of a request next to the HTTP path. Reported only:
256 -> 512 -> 10, whose ~55 us run costs about what handing a request to the batching thread
and back does (two thread switches under the GIL); there batching wins little or loses
(0.7x-1.06x in five runs here), measured so that operators know where ``max_batch`` pays.
Usage: python -m bench.batching [--seconds S] [--rounds N] [--window-us W] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bench._checks import gated, info, report
from bench.serve import LeanClient
from tests.support.daemon import DaemonProc, start_daemon
from tests.support.models import save

CLIENTS = 8
MAX_BATCH = 8
GATED = (1024, 1024)
SMALL = (256, 512)


def mlp(path: Path, features: int, hidden: int, classes: int = 10, seed: int = 0) -> Path:
    """softmax(relu(x @ W1 + b1) @ W2 + b2): ``x`` [N, features] float32, ``probs`` [N, classes]."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(features, hidden)) / np.sqrt(features)).astype(np.float32)
    b1 = (rng.normal(size=(hidden,)) * 0.1).astype(np.float32)
    w2 = (rng.normal(size=(hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (rng.normal(size=(classes,)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["m1"]),
            helper.make_node("Add", ["m1", "b1"], ["a1"]),
            helper.make_node("Relu", ["a1"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["m2"]),
            helper.make_node("Add", ["m2", "b2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
        initializer=[
            numpy_helper.from_array(w1, "W1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "W2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    return save(graph, path)


def _body(x: np.ndarray) -> bytes:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def _probs(reply: bytes) -> list[float]:
    data: list[float] = json.loads(reply)["outputs"][0]["data"]
    return data


def _round(
    clients: list[LeanClient], requests: list[bytes], seconds: float
) -> tuple[int, float, list[float]]:
    """All clients send back to back for ``seconds``: (requests done, wall time, latencies)."""
    latencies: list[list[float]] = [[] for _ in clients]
    errors: list[BaseException] = []
    start = threading.Barrier(len(clients) + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        send, request, mine = clients[i].send, requests[i], latencies[i]
        clock = time.perf_counter
        start.wait()
        try:
            while True:
                t = clock()
                send(request)
                now = clock()
                mine.append(now - t)
                if now >= stop_at[0]:
                    return
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]}")
    flat = [s for mine in latencies for s in mine]
    return len(flat), wall, flat


def run(seconds: float, rounds: int, window_us: int, features: int, hidden: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = mlp(Path(tmp) / "mlp.onnx", features, hidden)
        daemon: DaemonProc = start_daemon(
            Path(tmp),
            {
                "models": [
                    {"name": "mlp", "path": str(path)},
                    {
                        "name": "mlp_batched",
                        "path": str(path),
                        "max_batch": MAX_BATCH,
                        "batch_window_us": window_us,
                    },
                ],
                "telemetry": {"metrics_interval_s": 60},
            },
        )
        rng = np.random.default_rng(1)
        xs = [rng.normal(size=(1, features)).astype(np.float32) for _ in range(CLIENTS)]
        bodies = [_body(x) for x in xs]
        per_slot: dict[str, dict[str, Any]] = {}
        try:
            clients = [LeanClient(daemon.host, daemon.port) for _ in range(CLIENTS)]
            json_type = {"Content-Type": "application/json"}
            prepared = {
                slot: [
                    c.prepare(f"/v2/models/{slot}/infer", b, json_type)
                    for c, b in zip(clients, bodies, strict=True)
                ]
                for slot in ("mlp", "mlp_batched")
            }
            for i, c in enumerate(clients):  # batched answers equal unbatched, row for row
                plain = _probs(c.send(prepared["mlp"][i]))
                batched = _probs(c.send(prepared["mlp_batched"][i]))
                if not np.allclose(plain, batched, rtol=1e-5, atol=1e-7):
                    raise RuntimeError(f"client {i}: batched {batched} != unbatched {plain}")
            for slot in ("mlp", "mlp_batched"):  # warm the connections and the pool
                _round(clients, prepared[slot], 0.5)
            counts = dict.fromkeys(prepared, 0)
            walls = dict.fromkeys(prepared, 0.0)
            lats: dict[str, list[float]] = {slot: [] for slot in prepared}
            for _ in range(rounds):
                for slot, requests in prepared.items():
                    n, wall, lat = _round(clients, requests, seconds)
                    counts[slot] += n
                    walls[slot] += wall
                    lats[slot] += lat
            for c in clients:
                c.close()
        finally:
            daemon.stop()
        for slot, n in counts.items():
            ms = np.array(lats[slot]) * 1e3
            per_slot[slot] = {
                "requests": n,
                "throughput_rps": n / walls[slot],
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
            }
    off, on = per_slot["mlp"], per_slot["mlp_batched"]
    return {
        "model": f"MLP {features}->{hidden}->10",
        "clients": CLIENTS,
        "max_batch": MAX_BATCH,
        "batch_window_us": window_us,
        "unbatched": off,
        "batched": on,
        "throughput_ratio": on["throughput_rps"] / off["throughput_rps"],
        "p99_ratio": on["p99_ms"] / off["p99_ms"],
    }


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    r = results["gated"]
    off, on = r["unbatched"], r["batched"]
    what = f"{r['clients']} HTTP clients, {r['model']}, max_batch {r['max_batch']}"
    out = [
        gated(
            f"dynamic batching throughput ({what})",
            "above unbatched",
            f"{on['throughput_rps']:.0f} req/s ({r['throughput_ratio']:.2f}x)",
            f"unbatched {off['throughput_rps']:.0f} req/s",
            on["throughput_rps"] > off["throughput_rps"],
        ),
        gated(
            f"dynamic batching p99 latency ({what})",
            "no worse than unbatched",
            f"p99 {on['p99_ms']:.2f} ms ({r['p99_ratio']:.2f}x)",
            f"unbatched p99 {off['p99_ms']:.2f} ms",
            on["p99_ms"] <= off["p99_ms"],
        ),
        info(
            f"dynamic batching p50 latency ({what})",
            f"p50 {on['p50_ms']:.2f} ms",
            f"unbatched p50 {off['p50_ms']:.2f} ms",
        ),
    ]
    small = results.get("small")
    if small is not None:
        off, on = small["unbatched"], small["batched"]
        out.append(
            info(
                f"dynamic batching on a ~55 us model ({small['model']})",
                f"{on['throughput_rps']:.0f} req/s ({small['throughput_ratio']:.2f}x),"
                f" p99 {on['p99_ms']:.2f} ms",
                f"unbatched {off['throughput_rps']:.0f} req/s, p99 {off['p99_ms']:.2f} ms",
            )
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per slot, alternating")
    parser.add_argument("--window-us", type=int, default=500, help="batch_window_us")
    parser.add_argument("--no-small", action="store_true", help="skip the 256->512->10 rows")
    parser.add_argument("--json", action="store_true", help="print JSON results only")
    args = parser.parse_args()
    results = {"gated": run(args.seconds, args.rounds, args.window_us, *GATED)}
    if not args.no_small:
        results["small"] = run(args.seconds, args.rounds, args.window_us, *SMALL)
    if not args.json:
        print(json.dumps(results, indent=2))
    return report(results, checks(results), args.json)


if __name__ == "__main__":
    sys.exit(main())
