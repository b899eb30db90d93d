"""Serving overhead: bare ``session.run`` vs the in-process slot vs HTTP infer over keep-alive.

For the demo model, models with the signatures of real ones (a stateful voice-activity model:
float [1, 512] + float [2, 1, 128] + 0-d int64, 16 KB of JSON; a file-type classifier: int32
[1, 2048], 9.4 KB) and a heavier generated model (84 KB of JSON), measures in one run,
interleaved in rounds so machine noise hits every path alike:
  bare      onnxruntime.InferenceSession.run with the same options
  codec     the JSON work alone: msgspec decoding the request, encoding the bare outputs
  inproc    ModelSlot.predict (checks, timing, counting, swap-safe reference)
  http      POST /v2/models/{name}/infer with JSON tensors to a real ``inferd run`` process, one
            keep-alive connection, from a lean client (what curl, wrk or a C/Go client costs)
  http_bin  the same with the binary tensor extension (raw bytes in and out)
  floor     the binary request to a bare httptools server in another process that answers each
            parsed request with a fixed 2-byte reply: the loopback round trip and wake-ups any
            Python HTTP server pays on this machine at this minute (reported, not judged)
  http_lib  the JSON request again through Python's http.client, whose own request building and
            response parsing add about 100 us in the *caller*; reported, not judged
and prints p50/p99 and the overhead against DESIGN section 9:
  in-process <= 1.10x bare + 20 us;  HTTP p50 - bare p50 <= 300 us with JSON, <= 150 us with
  the binary extension (300 us for the heavy model's 16 KB of raw tensors). The heavy model's
  JSON path is held to 300 us beyond the codec's own cost (see ``cases``).
Each HTTP path's outputs are first checked equal to the bare runtime's.
The HTTP rows are bimodal on the 2-core development machine (a Firecracker VM): when the client
and the API worker thread run on one core, a small binary request's round trip is about 100 us;
when the scheduler puts them on different cores, the two wake-ups of each exchange cross cores
and it is 60-80 us more (pinned with taskset; the floor server pinned off the client's core goes
from 18 to 53-63 us, and unpinned it stays on it). The scheduler picks per block, so one run can
hold both: compare versions interleaved, and several runs.
The floor is a floor only for exchanges that end within a few microseconds: given any real work
per request (the demo model's run alone, 20 us in a hot loop; or the tiny JSON decode and
encode alone), the floor server's round trip goes from about 40 to about 200-230 us on the same
minute, most likely because the client then falls asleep in recv and its idle virtual CPU has
to be woken (the floor answers before it gets there).
A minimal single-thread server doing exactly inferd's work (httptools, ``decode_infer_request``,
``session.run``, ``encode_infer_response``; no threads, no listeners) measured within 15 % of
``inferd run``, either way, on the demo, VAD and file-type requests (2026-11-30): what the
HTTP rows hold beyond the floor is mostly that wake-up and the work itself, not the server
around it.
Usage: python -m bench.serve [--iterations N] [--only MODEL ...] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from agent.api.v2 import decode_infer_request, encode_infer_response
from agent.config import ModelConfig
from agent.slots import ModelSlot
from bench._checks import gated, report
from runtime.tensors import NUMPY_DTYPES, V2_DATATYPES
from tests.support import models
from tests.support.daemon import start_daemon, v2_inputs, v2_outputs

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
        self.head = b""

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
        self.head = head
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(rest) < length:
            rest += self.sock.recv(65536)
        return rest

    def header_length(self) -> int:
        """The Inference-Header-Content-Length of the last reply."""
        return int(
            self.head.lower().split(b"inference-header-content-length:", 1)[1].split(b"\r\n", 1)[0]
        )

    def close(self) -> None:
        self.sock.close()


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


FLOOR_SERVER = """
import socket, sys, httptools
class Done:
    complete = False
    def on_message_complete(self):
        self.complete = True
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(8)
print(srv.getsockname()[1], flush=True)
reply = b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: 2\\r\\n\\r\\n{}"
while True:
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    state = Done()
    parser = httptools.HttpRequestParser(state)
    while data := conn.recv(65536):
        parser.feed_data(data)
        if state.complete:
            state.complete = False
            conn.sendall(reply)
    conn.close()
"""
"""The floor: a server that parses each request with httptools and sends a fixed reply."""


class FloorServer:
    """:data:`FLOOR_SERVER` in another process, ended by its pid."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FLOOR_SERVER], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def filetype_like(path: Path, n_classes: int = 128) -> Path:
    """The signature of a file-type classifier: ``bytes`` int32 [1, 2048] (byte values, padded)
    in, ``probs`` float [1, n_classes] out. A JSON request is about 9.4 KB."""
    w = np.random.default_rng(1).normal(scale=0.01, size=(2048, n_classes)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["bytes"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["xf", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "filetype_like",
        [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["N", 2048])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_classes])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return models.save(graph, path)


class Case(NamedTuple):
    """A model, the feeds of one request, and the p50 overhead targets over bare (us)."""

    path: Path
    feeds: dict[str, np.ndarray]
    json_target_us: float
    binary_target_us: float
    beyond_codec: bool = False
    """Judge the JSON path by its overhead beyond the JSON codec's own cost (see ``cases``)."""


def cases(tmp: Path) -> dict[str, Case]:
    """The request shapes measured: the demo model, the real-model-sized VAD and classifier
    requests (issue 14), and a heavier generated model (4,096 floats in, 2,048 out, 84 KB).

    The heavy model's JSON path is judged beyond the codec: decoding 4,096 JSON numbers and
    printing 2,048 takes msgspec (the fastest JSON library for Python) about 250 us on its own
    here, so 300 us in all cannot be met by any Python server; that figure is measured in the
    same run and the rest of the path is held to 300 us. Such requests belong on the binary
    extension, whose 300 us target is absolute."""
    rng = np.random.default_rng(0)
    demo_x = np.load(ROOT / "examples/models/demo.golden.npz")["x"][:1]
    return {
        "demo": Case(ROOT / "examples/models/demo.onnx", {"x": demo_x}, 300, 150),
        "vad": Case(
            models.vad_like(tmp / "vad.onnx"),
            {
                "input": rng.uniform(-1, 1, size=(1, 512)).astype(np.float32),
                "state": rng.normal(size=(2, 1, 128)).astype(np.float32),
                "sr": np.array(16000, dtype=np.int64),
            },
            300,
            150,
        ),
        "filetype": Case(
            filetype_like(tmp / "filetype.onnx"),
            {"bytes": rng.integers(0, 257, size=(1, 2048)).astype(np.int32)},
            300,
            150,
        ),
        "heavy": Case(
            models.classifier(tmp / "heavy.onnx", n_features=512, n_classes=256),
            {"x": rng.normal(size=(8, 512)).astype(np.float32)},
            300,
            300,
            beyond_codec=True,
        ),
    }


def json_body(feeds: dict[str, np.ndarray]) -> bytes:
    """A v2 JSON request as a numpy-based Python client writes it."""
    return json.dumps({"inputs": v2_inputs(feeds)}).encode()


def binary_body(feeds: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """A request with the binary tensor extension both ways: (body, JSON header length)."""
    inputs = [
        {
            "name": name,
            "shape": list(x.shape),
            "datatype": V2_DATATYPES[x.dtype.name],
            "parameters": {"binary_data_size": x.nbytes},
        }
        for name, x in feeds.items()
    ]
    head = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    return head + b"".join(
        x.astype(x.dtype.newbyteorder("<")).tobytes() for x in feeds.values()
    ), len(head)


def json_outputs(body: bytes) -> dict[str, np.ndarray]:
    """The outputs of a v2 JSON response."""
    return v2_outputs(json.loads(body))


def binary_outputs(body: bytes, head_length: int) -> dict[str, np.ndarray]:
    """The outputs of a v2 response whose tensors follow the JSON header as raw bytes."""
    out, offset = {}, head_length
    for o in json.loads(body[:head_length])["outputs"]:
        size = o["parameters"]["binary_data_size"]
        dtype = np.dtype(NUMPY_DTYPES[o["datatype"]]).newbyteorder("<")
        out[o["name"]] = np.frombuffer(body[offset : offset + size], dtype).reshape(o["shape"])
        offset += size
    return out


def check_equal(what: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Raise unless ``got`` holds exactly the bare runtime's outputs."""
    if set(got) != set(want) or not all(np.array_equal(got[k], want[k]) for k in want):
        raise RuntimeError(f"{what}: outputs differ from bare onnxruntime")


def bench_model(name: str, case: Case, iterations: int, tmp: Path) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(case.path), so, providers=["CPUExecutionProvider"])
    feeds = case.feeds
    names = [o.name for o in session.get_outputs()]
    want = dict(zip(names, session.run(None, feeds), strict=True))
    slot = ModelSlot(ModelConfig(name=name, path=str(case.path)))
    slot.swap(slot.load(case.path, "1"))
    daemon = start_daemon(tmp / name, {"models": [{"name": name, "path": str(case.path)}]})
    body = json_body(feeds)
    bin_body, head_len = binary_body(feeds)
    conn = http.client.HTTPConnection(daemon.host, daemon.port)
    lean = LeanClient(daemon.host, daemon.port)
    floor_server = FloorServer()
    floor = LeanClient("127.0.0.1", floor_server.port)
    path = f"/v2/models/{name}/infer"

    def post(payload: bytes, headers: dict[str, str]) -> None:
        conn.request("POST", path, body=payload, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")

    json_headers = {"Content-Type": "application/json"}
    bin_headers = {"Inference-Header-Content-Length": str(head_len)}
    json_req = lean.prepare(path, body, json_headers)
    bin_req = lean.prepare(path, bin_body, bin_headers)
    floor_req = floor.prepare(path, bin_body, bin_headers)

    def codec() -> object:
        """The JSON work alone: decode the request, encode the bare outputs."""
        decode_infer_request(body)
        return encode_infer_response(name, "1", "", want)

    paths: dict[str, Callable[[], object]] = {
        "bare": lambda: session.run(None, feeds),
        "codec": codec,
        "inproc": lambda: slot.predict(feeds),
        "http": lambda: lean.send(json_req),
        "http_bin": lambda: lean.send(bin_req),
        "floor": lambda: floor.send(floor_req),
        "http_lib": lambda: post(body, json_headers),
    }
    samples: dict[str, list[float]] = {k: [] for k in paths}
    try:
        check_equal(f"{name} JSON", json_outputs(lean.send(json_req)), want)
        bin_reply = lean.send(bin_req)
        check_equal(f"{name} binary", binary_outputs(bin_reply, lean.header_length()), want)
        for fn in paths.values():
            timed(fn, 50)  # warm caches and the connection
        rounds = 10
        for _ in range(rounds):
            for key, fn in paths.items():
                samples[key] += timed(fn, iterations // rounds)
    finally:
        conn.close()
        lean.close()
        floor.close()
        floor_server.stop()
        daemon.stop()
        slot.close()
    res: dict[str, float] = {}
    for key, s in samples.items():
        res[f"{key}_p50_us"], res[f"{key}_p99_us"] = percentiles(s)
    res["request_json_bytes"] = len(body)
    res["request_binary_bytes"] = len(bin_body)
    res["inproc_ratio_p50"] = res["inproc_p50_us"] / res["bare_p50_us"]
    res["inproc_budget_p50_us"] = 1.10 * res["bare_p50_us"] + 20
    res["inproc_ok"] = res["inproc_p50_us"] <= res["inproc_budget_p50_us"]
    for key, target in (("http", case.json_target_us), ("http_bin", case.binary_target_us)):
        res[f"{key}_overhead_p50_us"] = res[f"{key}_p50_us"] - res["bare_p50_us"]
        res[f"{key}_target_us"] = target
        res[f"{key}_ok"] = res[f"{key}_overhead_p50_us"] <= target
    res["beyond_codec"] = case.beyond_codec
    if case.beyond_codec:
        res["http_beyond_codec_p50_us"] = res["http_overhead_p50_us"] - res["codec_p50_us"]
        res["http_ok"] = res["http_beyond_codec_p50_us"] <= case.json_target_us
    return res


def checks(results: dict) -> list[dict]:
    """The DESIGN section 9 rows this benchmark measures, for bench/run.py."""
    out = []
    for name, r in results.items():
        bare = f"bare session.run p50 {r['bare_p50_us']:.1f} us"
        out.append(
            gated(
                f"in-process predict overhead ({name})",
                "<= 1.10x + 20 us",
                f"p50 {r['inproc_p50_us']:.1f} us ({r['inproc_ratio_p50']:.2f}x)",
                bare,
                r["inproc_ok"],
            )
        )
        size = f" ({r['request_json_bytes'] / 1000:.1f} KB JSON)"
        if r.get("beyond_codec"):
            out.append(
                gated(
                    f"HTTP v2 infer overhead beyond the JSON codec ({name})",
                    f"p50 <= {r['http_target_us']:.0f} us over bare + codec",
                    f"+{r['http_beyond_codec_p50_us']:.1f} us{size};"
                    f" +{r['http_overhead_p50_us']:.1f} us over bare in all",
                    f"{bare}; msgspec decode + encode alone p50 {r['codec_p50_us']:.1f} us",
                    r["http_ok"],
                )
            )
        else:
            out.append(
                gated(
                    f"HTTP v2 infer overhead, JSON tensors ({name})",
                    f"p50 <= {r['http_target_us']:.0f} us over bare",
                    f"+{r['http_overhead_p50_us']:.1f} us{size}",
                    bare,
                    r["http_ok"],
                )
            )
        out.append(
            gated(
                f"HTTP v2 infer overhead, binary tensors ({name})",
                f"p50 <= {r['http_bin_target_us']:.0f} us over bare",
                f"+{r['http_bin_overhead_p50_us']:.1f} us",
                f"{bare}; a bare httptools server's round trip p50 {r['floor_p50_us']:.1f} us",
                r["http_bin_ok"],
            )
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print JSON results only")
    parser.add_argument("--only", nargs="+", metavar="MODEL", help="measure only these models")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        results = {}
        for name, case in cases(tmp).items():
            if args.only and name not in args.only:
                continue
            (tmp / name).mkdir()
            results[name] = bench_model(name, case, args.iterations, tmp)
    if not args.json:
        print(f"{'model':8} {'path':8} {'p50 us':>9} {'p99 us':>9}")
        for name, r in results.items():
            for key in ("bare", "codec", "inproc", "http", "http_bin", "floor", "http_lib"):
                print(f"{name:8} {key:8} {r[key + '_p50_us']:9.1f} {r[key + '_p99_us']:9.1f}")
        print()
    return report(results, checks(results), args.json)


if __name__ == "__main__":
    sys.exit(main())
