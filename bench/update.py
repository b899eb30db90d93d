"""Updates under load: push a new version to a real ``inferd run`` while clients keep inferring.

In one run:
  steady     HTTP infer p99 under constant load (2 keep-alive clients), between updates
  swap       the same p99 from ``inferctl push`` until 0.5 s after the new version serves
             (TUF check, download, validation beside the serving model, swap, trial);
             three updates in a row, their windows pooled
  push       seconds from ``inferctl push`` (retained MQTT poke) to the new version answering
             (the slowest of the three)
  failed     requests that did not get a 200 during the whole run
  download   TUF check + download + hash verification of a 50 MB artifact from a local HTTP
             server, against a bare HTTP GET of the same file (baseline)
Targets (DESIGN section 9): 0 failed requests, swap p99 <= 2x steady p99, push to serving
<= 2 s. The daemon and ``inferctl push`` talk through a private mosquitto started for the run.
Usage: python -m bench.update [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bench._checks import gated, info, report
from tests.support import models
from tests.support.broker import Broker
from tests.support.daemon import start_daemon
from updater.device.client import RepositoryClient
from updater.inferctl.main import main as inferctl
from updater.operator.repository import OperatorRepository
from updater.operator.serve import RepositoryServer

UPDATES = 3
BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}
).encode()


class Load:
    """Client threads sending infer requests; every latency and failure is recorded."""

    def __init__(self, port: int, clients: int = 2) -> None:
        self.port = port
        self.samples: list[tuple[float, float]] = []  # (time sent, latency s)
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, name=f"bench-load-{i}") for i in range(clients)
        ]

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                conn.request("POST", "/v2/models/classifier/infer", BODY,
                             {"Content-Type": "application/json"})  # fmt: skip
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    self.failures.append(f"HTTP {resp.status}")
            except (OSError, http.client.HTTPException) as err:
                self.failures.append(repr(err))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            self.samples.append((start, time.perf_counter() - start))
        conn.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def p99_ms(self, windows: list[tuple[float, float]]) -> tuple[float, int]:
        lat = [lat for start, lat in self.samples if any(a <= start < b for a, b in windows)]
        return float(np.percentile(np.array(lat) * 1e3, 99)), len(lat)


def serving_version(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/v2/models/classifier")
        data = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return str(data["versions"][0])


def big_model(path: Path, megabytes: int) -> Path:
    """A classifier padded with an unused initializer to ``megabytes``."""
    models.classifier(path, seed=5)
    m = onnx.load(str(path))
    pad = np.ones(megabytes * 1024 * 1024 // 4, np.float32)
    m.graph.initializer.append(numpy_helper.from_array(pad, "pad"))
    onnx.save(m, str(path))
    return path


def bench_swap(
    tmp: Path, broker: Broker, repo: OperatorRepository, url: str, trusted: Path
) -> dict[str, float]:
    config = {
        "groups": ["bench"],
        "models": [{"name": "classifier", "path": str(models.classifier(tmp / "v1.onnx"))}],
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port},
        "telemetry": {"prediction_sample_rate": 0.0},
        "updates": {
            "repository_url": url,
            "trusted_root": str(trusted),
            "poll_interval_s": 3600,
            "check_on_start": False,
            "trial_window_s": 1.0,
        },
    }
    (tmp / "daemon").mkdir()
    daemon = start_daemon(tmp / "daemon", config)
    try:
        steady: list[tuple[float, float]] = []
        swaps: list[tuple[float, float]] = []
        pushes: list[float] = []
        with Load(daemon.port) as load:
            time.sleep(1.0)  # warm
            for version in range(2, 2 + UPDATES):
                start = time.perf_counter()
                time.sleep(2.0)
                steady.append((start, time.perf_counter()))
                model = models.classifier(tmp / f"v{version}.onnx", seed=version)
                repo.add_model(model, name="classifier", version=str(version))
                push = time.perf_counter()
                pushed = inferctl(
                    ["push", "--group", "bench", "--broker", f"{broker.host}:{broker.port}"]
                )
                if pushed != 0:
                    raise SystemExit(f"inferctl push exited {pushed}")
                while serving_version(daemon.port) != str(version):
                    if time.perf_counter() - push > 30:
                        raise SystemExit(f"version {version} never served:\n{daemon.stderr()}")
                    time.sleep(0.005)
                serving = time.perf_counter()
                pushes.append(serving - push)
                swaps.append((push, serving + 0.5))
                time.sleep(1.5)  # through the trial window
        steady_p99, steady_n = load.p99_ms(steady)
        swap_p99, swap_n = load.p99_ms(swaps)
        return {
            "updates": UPDATES,
            "steady_p99_ms": steady_p99,
            "swap_p99_ms": swap_p99,
            "swap_ratio": swap_p99 / steady_p99,
            "push_to_serving_s": max(pushes),
            "push_to_serving_median_s": float(np.median(pushes)),
            "requests": len(load.samples) + len(load.failures),
            "failed_requests": len(load.failures),
            "steady_requests": steady_n,
            "swap_requests": swap_n,
        }
    finally:
        daemon.stop()


def bench_download(
    tmp: Path, repo: OperatorRepository, url: str, trusted: Path
) -> dict[str, float]:
    big = big_model(tmp / "big.onnx", 50)
    repo.add_model(big, name="big", version="1")
    target = next(t for _p, t, m in repo.models() if m.name == "big")
    size = target.length
    served = f"{url}targets/big/1/{target.hashes['sha256']}.big.onnx"
    start = time.perf_counter()
    with urllib.request.urlopen(served) as resp, open(tmp / "raw.bin", "wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)
    raw = time.perf_counter() - start
    client = RepositoryClient(url, trusted, tmp / "dl-state", max_download_bytes=1 << 30)
    start = time.perf_counter()
    (offer,) = client.check(["big"], [])
    local = client.download(offer.path, offer.target)
    client.verify(offer.path, offer.target, local)
    tuf = time.perf_counter() - start
    return {
        "artifact_mb": size / 1e6,
        "raw_get_mb_s": size / 1e6 / raw,
        "tuf_verified_mb_s": size / 1e6 / tuf,
        "tuf_vs_raw_time": tuf / raw,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="inferd-bench-update-"))
    try:
        repo = OperatorRepository.init(tmp / "repo")
        trusted = tmp / "root.json"
        shutil.copyfile(repo.metadata_dir / "1.root.json", trusted)
        server = RepositoryServer(repo.public_dir).start()
        broker = Broker(tmp)
        try:
            broker.start()
            swap = bench_swap(tmp, broker, repo, server.url, trusted)
            dl = bench_download(tmp, repo, server.url, trusted)
        finally:
            broker.kill()
            server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    checks = [
        gated(
            "failed requests during an update under load",
            "0",
            swap["failed_requests"],
            f"{swap['requests']} requests",
            swap["failed_requests"] == 0,
        ),
        gated(
            "p99 during swap vs steady p99",
            "<= 2.0x",
            f"{swap['swap_ratio']:.2f}x ({swap['swap_p99_ms']:.2f} ms)",
            f"{swap['steady_p99_ms']:.2f} ms steady",
            swap["swap_ratio"] <= 2.0,
        ),
        gated(
            "inferctl push to new version serving (slowest of 3)",
            "<= 2 s",
            f"{swap['push_to_serving_s']:.2f} s",
            f"median {swap['push_to_serving_median_s']:.2f} s",
            swap["push_to_serving_s"] <= 2.0,
        ),
        info(
            "TUF check+download+verify of a 50 MB artifact",
            f"{dl['tuf_verified_mb_s']:.0f} MB/s ({dl['tuf_vs_raw_time']:.2f}x raw time)",
            f"{dl['raw_get_mb_s']:.0f} MB/s bare HTTP GET",
        ),
    ]
    return report({"swap": swap, "download": dl}, checks, args.json)


if __name__ == "__main__":
    sys.exit(main())
