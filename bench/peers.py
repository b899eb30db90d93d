"""inferd side by side with Seldon MLServer: the same models, the same client, one run.

Opt-in (``make bench-peers``; never part of ``make bench`` or CI): installs MLServer into a
throwaway venv under build/ (not the lock), serves the VAD-class and classifier-class models of
``bench.serve`` from both servers on free loopback ports, and measures, interleaved in rounds so
machine noise hits every path alike:
  bare      onnxruntime.InferenceSession.run (one thread, as both servers' sessions)
  inferd    POST /v2/models/{name}/infer, JSON tensors, one keep-alive connection, ``inferd run``
  mlserver  the same request to MLServer 1.7.1 serving in-process (``parallel_workers: 0``): it
            has no ONNX runtime package, so a custom ``MLModel`` calls onnxruntime, the way its
            docs show for any other framework
Every reply is checked equal to the bare runtime's outputs before timing. The figure is the p50
overhead over bare of each server and their ratio; the target (issue 14) is inferd's overhead at
least 4x below MLServer's on both request shapes. The rows are merged into bench/results.json and
bench/results.md beside those of the last ``make bench``.
Usage: python -m bench.peers [--iterations N] [--venv DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bench import serve
from bench._checks import Check, gated
from tests.support.daemon import start_daemon
from tests.support.locked_venv import LockedVenv, VenvBuildError
from tests.support.net import free_port, wait_serving
from tests.support.zoo import ZooError

ROOT = Path(__file__).resolve().parents[1]
MLSERVER_VERSION = "1.7.1"
TARGET_RATIO = 4.0
SHAPES = ("vad", "filetype")

# The MLServer side: a custom runtime, as MLServer's docs show for a framework it has no
# package for. NumpyCodec is MLServer's own v2 <-> numpy conversion.
_MODEL_CODE = """
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            self.settings.parameters.uri, so, providers=["CPUExecutionProvider"]
        )
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outs = self.session.run(None, feeds)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(n, o) for n, o in zip(self.output_names, outs)],
        )
"""


def ensure_venv(base: Path) -> Path:
    """The interpreter of a venv under ``base`` with MLServer, built on first use; the same
    onnxruntime and numpy versions as inferd's, so the runtimes under both servers are the same
    code."""
    import numpy as np

    pins = (f"mlserver=={MLSERVER_VERSION}", f"onnxruntime=={ort.__version__}")
    venv = LockedVenv("bench-peers-venv", None, ((*pins, f"numpy=={np.__version__}"),), base)
    if not venv.ready():
        print(f"installing MLServer into {venv.path}", file=sys.stderr, flush=True)
    return venv.python()


class MLServer:
    """An ``mlserver start`` process serving ``models`` (name -> ONNX path) in-process."""

    def __init__(self, python: Path, models: dict[str, Path], tmp: Path) -> None:
        root = tmp / "mlserver"
        root.mkdir()
        (root / "peer_model.py").write_text(_MODEL_CODE)
        self.port = free_port()
        settings = {
            "host": "127.0.0.1",
            "http_port": self.port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "parallel_workers": 0,  # in-process: inference runs in the server's own process
            "debug": False,
        }
        (root / "settings.json").write_text(json.dumps(settings))
        for name, path in models.items():
            (root / name).mkdir()
            (root / name / "model-settings.json").write_text(
                json.dumps(
                    {
                        "name": name,
                        "implementation": "peer_model.OnnxModel",
                        "parameters": {"uri": str(path)},
                    }
                )
            )
        self.log = tmp / "mlserver.log"
        env = {**os.environ, "PYTHONPATH": str(root)}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(python), "-m", "mlserver.cli.main", "start", str(root)],
                cwd=root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() ends whatever it started
            )
        self._wait_ready(list(models))

    def _wait_ready(self, names: list[str], timeout: float = 120.0) -> None:
        pending = list(names)

        def ready() -> bool:
            while pending:
                url = f"http://127.0.0.1:{self.port}/v2/models/{pending[0]}/ready"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status != 200:
                        return False
                pending.pop(0)
            return True

        wait_serving(self.proc, ready, "mlserver", timeout, self.tail, interval=0.2)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def measure(
    cases: dict[str, serve.Case], ports: dict[str, int], iterations: int
) -> dict[str, dict[str, Any]]:
    """Per request shape: p50/p99 of bare and of each server (``ports``: server -> port), the
    overheads and their ratio."""
    results: dict[str, dict[str, Any]] = {}
    for name, case in cases.items():
        samples = _samples(name, case, ports, iterations)
        r: dict[str, Any] = {"request_json_bytes": len(serve.json_body(case.feeds))}
        for key, s in samples.items():
            r[f"{key}_p50_us"], r[f"{key}_p99_us"] = serve.percentiles(s)
        for key in ports:
            r[f"{key}_overhead_p50_us"] = r[f"{key}_p50_us"] - r["bare_p50_us"]
        r["ratio"] = r["mlserver_overhead_p50_us"] / max(r["inferd_overhead_p50_us"], 1.0)
        r["ok"] = r["ratio"] >= TARGET_RATIO
        results[name] = r
    return results


def _samples(
    name: str, case: serve.Case, ports: dict[str, int], iterations: int
) -> dict[str, list[float]]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(case.path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    want = dict(zip(names, session.run(None, case.feeds), strict=True))
    body = serve.json_body(case.feeds)
    path = f"/v2/models/{name}/infer"
    headers = {"Content-Type": "application/json"}
    clients = {key: serve.LeanClient("127.0.0.1", port) for key, port in ports.items()}
    try:
        paths: dict[str, Callable[[], object]] = {"bare": lambda: session.run(None, case.feeds)}
        for key, client in clients.items():
            request = client.prepare(path, body, headers)
            serve.check_equal(f"{key} {name}", serve.json_outputs(client.send(request)), want)
            paths[key] = lambda c=client, r=request: c.send(r)
        samples: dict[str, list[float]] = {k: [] for k in paths}
        for fn in paths.values():
            serve.timed(fn, 50)  # warm caches and the connections
        rounds = 10
        for _ in range(rounds):
            for key, fn in paths.items():
                samples[key] += serve.timed(fn, iterations // rounds)
    finally:
        for c in clients.values():
            c.close()
    return samples


def checks(results: dict[str, dict[str, Any]]) -> list[Check]:
    return [
        gated(
            f"HTTP infer overhead vs Seldon MLServer {MLSERVER_VERSION} in-process, JSON ({name},"
            f" {r['request_json_bytes'] / 1000:.1f} KB)",
            f">= {TARGET_RATIO:.0f}x below MLServer's",
            f"{r['ratio']:.2f}x: inferd +{r['inferd_overhead_p50_us']:.0f} us,"
            f" MLServer +{r['mlserver_overhead_p50_us']:.0f} us",
            f"bare session.run p50 {r['bare_p50_us']:.1f} us",
            r["ok"],
        )
        for name, r in results.items()
    ]


def record(results: dict[str, Any], rows: list[Check]) -> None:
    """Merge the rows into bench/results.json and results.md, keeping the other benchmarks'."""
    from bench import run

    run.merge_into_results("peers", rows, lambda _earlier: results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument(
        "--venv", type=Path, default=ROOT / "build", help="folder of MLServer's venv (build/)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON results only")
    args = parser.parse_args()
    try:
        python = ensure_venv(args.venv)
    except (ZooError, VenvBuildError, subprocess.CalledProcessError) as err:
        print(f"bench.peers: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        cases = {k: v for k, v in serve.cases(tmp).items() if k in SHAPES}
        (tmp / "inferd").mkdir()
        daemon = start_daemon(
            tmp / "inferd", {"models": [{"name": k, "path": str(c.path)} for k, c in cases.items()]}
        )
        peer = None
        try:
            peer = MLServer(python, {k: c.path for k, c in cases.items()}, tmp)
            results = measure(
                cases, {"inferd": daemon.port, "mlserver": peer.port}, args.iterations
            )
        finally:
            if peer is not None:
                peer.stop()
            daemon.stop()
    meta = {"mlserver": MLSERVER_VERSION, "onnxruntime": ort.__version__}
    out = {"results": {**results, "versions": meta}, "checks": checks(results)}
    record(out["results"], out["checks"])
    if args.json:
        print(json.dumps(out, indent=2))
        return 0 if all(r["ok"] for r in results.values()) else 1
    print(f"{'model':9} {'path':9} {'p50 us':>9} {'p99 us':>9} {'overhead':>9}")
    for name, r in results.items():
        for key in ("bare", "inferd", "mlserver"):
            extra = f"{r[key + '_overhead_p50_us']:9.1f}" if key != "bare" else ""
            print(f"{name:9} {key:9} {r[key + '_p50_us']:9.1f} {r[key + '_p99_us']:9.1f} {extra}")
    print()
    for c in out["checks"]:
        print(f"{c['name']}: {c['measured']} (target {c['target']}):"
              f" {'PASS' if c['pass'] else 'FAIL'}")  # fmt: skip
    print("written to bench/results.json and bench/results.md")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
