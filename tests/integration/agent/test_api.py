"""The local OIP v2 API against a real `inferd run` process over HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.daemon import DaemonProc

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "models" / "demo.onnx"
GOLDEN = ROOT / "examples" / "models" / "demo.golden.npz"


@pytest.fixture
def daemon(inferd_daemon, model_factory) -> DaemonProc:
    return inferd_daemon(
        {
            "models": [
                {"name": "demo", "path": str(DEMO), "labels": ["idle", "walking", "running"]},
                {"name": "multi", "path": str(model_factory("multi_io")), "version": "7"},
                {"name": "broken", "path": str(model_factory("failing"))},
            ],
            "api": {"max_body_bytes": 4096},
        }
    )


def x_tensor(x: np.ndarray, name: str = "x") -> dict:
    return {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}


def test_health_and_metadata(daemon: DaemonProc) -> None:
    assert daemon.request("GET", "/v2/health/live") == (200, {"live": True})
    assert daemon.request("GET", "/v2/health/ready") == (200, {"ready": True})
    status, meta = daemon.request("GET", "/v2/models/demo")
    assert status == 200
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert daemon.request("GET", "/v2/models/multi/versions/7")[0] == 200
    assert daemon.request("GET", "/v2/models/multi/versions/6")[0] == 404
    assert daemon.request("GET", "/v2/models/demo/ready") == (200, {"name": "demo", "ready": True})


def test_infer_returns_golden_output(daemon: DaemonProc) -> None:
    golden = np.load(GOLDEN)
    status, body = daemon.infer("demo", [x_tensor(golden["x"])], id="req-42")
    assert status == 200, body
    assert body["id"] == "req-42" and body["model_version"] == "1"
    out = body["outputs"][0]
    assert out["name"] == "probs" and out["shape"] == [8, 3]
    np.testing.assert_allclose(np.array(out["data"]).reshape(8, 3), golden["probs"], rtol=1e-5)


def test_outputs_selection_and_classification(daemon: DaemonProc) -> None:
    inputs = [
        {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [[1, 2, 3]]},
        {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]},
        {"name": "k", "shape": [], "datatype": "INT64", "data": [2]},
    ]
    status, body = daemon.infer("multi", inputs, outputs=[{"name": "scaled"}])
    assert status == 200, body
    assert [o["name"] for o in body["outputs"]] == ["scaled"]
    assert body["outputs"][0]["data"] == [2.0, 4.0, 6.0]
    golden = np.load(GOLDEN)
    status, body = daemon.infer(
        "demo",
        [x_tensor(golden["x"][:1])],
        outputs=[{"name": "probs", "parameters": {"classification": 2}}],
    )
    assert status == 200, body
    top = body["outputs"][0]
    assert top["datatype"] == "BYTES" and top["shape"] == [1, 2]
    best = int(golden["probs"][0].argmax())
    assert top["data"][0].split(":")[1:] == [str(best), ["idle", "walking", "running"][best]]


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v2/models/nope/infer", {"inputs": []}, 404, "model 'nope' not found"),
        (
            "/v2/models/demo/infer",
            {"inputs": [{"name": "q", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}]},
            400,
            "unknown input 'q'",
        ),
        (
            "/v2/models/demo/infer",
            {"inputs": [{"name": "x", "shape": [1, 7], "datatype": "FP32", "data": [0] * 7}]},
            400,
            "expects [-1, 8]",
        ),
        (
            "/v2/models/demo/infer",
            {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "INT32", "data": [0] * 8}]},
            400,
            "expects FP32",
        ),
        (
            "/v2/models/demo/infer",
            {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 5}]},
            400,
            "5 values do not fill",
        ),
        (
            "/v2/models/demo/infer",
            {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": ["a"] * 8}]},
            400,
            "data is not FP32",
        ),
        (
            "/v2/models/demo/infer",
            {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "WAT", "data": [0] * 8}]},
            400,
            "unsupported datatype",
        ),
        ("/v2/models/demo/infer", {"nope": 1}, 400, "inputs"),
        (
            "/v2/models/demo/infer",
            {
                "inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}],
                "outputs": [{"name": "zz"}],
            },
            400,
            "unknown output 'zz'",
        ),
        ("/v2/nothing", None, 404, "no such endpoint"),
    ],
)
def test_bad_requests_get_clear_4xx(
    daemon: DaemonProc, path: str, body: dict | None, status: int, fragment: str
) -> None:
    got, reply = daemon.request("POST" if body is not None else "GET", path, body)
    assert got == status
    assert fragment in reply["error"]
    assert daemon.request("GET", "/v2/health/ready")[0] == 200, "the daemon keeps serving"


def test_malformed_json_and_oversized_body(daemon: DaemonProc) -> None:
    status, reply = daemon.request("POST", "/v2/models/demo/infer", raw=b'{"inputs": [')
    assert status == 400 and "malformed JSON" in reply["error"]
    status, reply = daemon.request("POST", "/v2/models/demo/infer", raw=b"x" * 5000)
    assert status == 413 and "over the limit of 4096" in reply["error"]
    golden = np.load(GOLDEN)
    assert daemon.infer("demo", [x_tensor(golden["x"][:1])])[0] == 200


def test_runtime_failure_is_500_and_daemon_keeps_serving(daemon: DaemonProc) -> None:
    ok = daemon.infer("broken", [x_tensor(np.zeros((1, 4), np.float32))])
    assert ok[0] == 200
    status, reply = daemon.infer("broken", [x_tensor(np.ones((1, 4), np.float32))])
    # The runtime's own message stays in the log: a 500 never echoes exception text.
    assert (
        status == 500
        and reply["error"] == "the model failed to run; the daemon log has the details"
    )
    assert "onnxruntime run failed" in daemon.stderr()
    assert daemon.infer("broken", [x_tensor(np.zeros((1, 4), np.float32))])[0] == 200


def test_prometheus_metrics_count_requests(daemon: DaemonProc) -> None:
    golden = np.load(GOLDEN)
    for _ in range(3):
        daemon.infer("demo", [x_tensor(golden["x"][:1])])
    status, text = daemon.request("GET", "/metrics")
    assert status == 200
    assert 'inferd_inference_requests_total{model="demo",version="1"} 3' in text
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)), "each metric family appears once"


def test_keep_alive_and_nodelay(daemon: DaemonProc) -> None:
    conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=10)
    conn.connect()
    sock = conn.sock
    for _ in range(20):
        conn.request("GET", "/v2/health/live")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    assert conn.sock is sock, "one TCP connection served every request"
    conn.close()


def test_slow_request_does_not_block_health(inferd_daemon, tmp_path: Path) -> None:
    """A big batch keeps one connection busy; health answers on another meanwhile."""
    from tests.support import models

    path = models.classifier(tmp_path / "big.onnx", n_features=2048, n_classes=2048)
    daemon = inferd_daemon({"models": [{"name": "big", "path": str(path), "threads": 1}]})
    x = np.random.default_rng(0).normal(size=(256, 2048)).astype(np.float32)
    body = json.dumps({"inputs": [x_tensor(x)]}).encode()
    done = threading.Event()

    def slow() -> None:
        c = http.client.HTTPConnection(daemon.host, daemon.port, timeout=60)
        for _ in range(3):
            c.request("POST", "/v2/models/big/infer", body=body)
            assert c.getresponse().read()
        done.set()

    t = threading.Thread(target=slow)
    t.start()
    worst = 0.0
    while not done.is_set():
        start = time.monotonic()
        assert daemon.request("GET", "/v2/health/live")[0] == 200
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.01)
    t.join()
    assert worst < 0.5, f"a health check waited {worst:.2f}s behind a slow inference"


def test_unix_socket_listener(inferd_daemon, tmp_path: Path) -> None:
    sock_path = tmp_path / "run" / "api.sock"
    from tests.support.daemon import start_daemon

    d = tmp_path / "u"
    d.mkdir()
    daemon = start_daemon(
        d,
        {"models": [{"name": "demo", "path": str(DEMO)}], "api": {"listen": f"unix:{sock_path}"}},
        wait=False,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while b'"ready"' not in reply:
            chunk = s.recv(4096)
            assert chunk, f"connection closed after {reply!r}"
            reply += chunk
        s.close()
        assert reply.startswith(b"HTTP/1.1 200") and b'"ready":true' in reply
    finally:
        assert daemon.stop() == 0
    assert not sock_path.exists(), "the socket file is removed on shutdown"


def test_sigterm_finishes_in_flight_requests(inferd_daemon, tmp_path: Path) -> None:
    """A request whose model run is under way at SIGTERM is answered before the daemon exits.

    The spin model's run time is set by its input, calibrated here to about two seconds, so
    the request is small (parsed at once) and certainly running when the signal comes."""
    from tests.support import models

    path = models.spin(tmp_path / "spin.onnx")
    daemon = inferd_daemon(
        {"models": [{"name": "spin", "path": str(path)}], "api": {"drain_timeout_s": 60}}
    )

    def spin(n: int) -> bytes:
        return json.dumps(
            {"inputs": [{"name": "n", "shape": [], "datatype": "INT64", "data": [n]}]}
        ).encode()

    c = http.client.HTTPConnection(daemon.host, daemon.port, timeout=60)
    began = time.perf_counter()
    c.request("POST", "/v2/models/spin/infer", body=spin(200_000))
    assert c.getresponse().read() and time.perf_counter() - began > 0
    per_iteration = (time.perf_counter() - began) / 200_000
    n = int(2.0 / per_iteration)
    result: dict[str, Any] = {}
    sent = threading.Event()

    def slow() -> None:
        c = http.client.HTTPConnection(daemon.host, daemon.port, timeout=120)
        c.request("POST", "/v2/models/spin/infer", body=spin(n))
        sent.set()
        resp = c.getresponse()
        result["body"] = json.loads(resp.read())
        result["status"] = resp.status

    t = threading.Thread(target=slow)
    t.start()
    assert sent.wait(30)
    time.sleep(0.3)  # the small request is parsed and its run begun; the run takes ~2 s
    stopping = time.perf_counter()
    assert daemon.stop() == 0
    t.join()
    assert result.get("status") == 200, "the in-flight request finished before exit"
    assert result["body"]["outputs"][0]["data"] == [float(n)]
    assert time.perf_counter() - stopping < 60, "the daemon exits once the request is answered"


def test_model_that_fails_to_load_is_503_others_serve(inferd_daemon, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    from tests.support.daemon import start_daemon

    d = tmp_path / "d"
    d.mkdir()
    daemon = start_daemon(
        d,
        {"models": [{"name": "demo", "path": str(DEMO)}, {"name": "bad", "path": str(bad)}]},
        wait=False,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if daemon.request("GET", "/v2/health/live")[0] == 200:
                    break
            except OSError:
                daemon._conn = None
                time.sleep(0.05)
        assert daemon.request("GET", "/v2/health/ready")[0] == 503
        status, reply = daemon.request("GET", "/v2/models/bad")
        assert status == 503 and "not loaded" in reply["error"]
        golden = np.load(GOLDEN)
        assert daemon.infer("demo", [x_tensor(golden["x"][:1])])[0] == 200
        assert "cannot load ONNX model" in daemon.stderr()
    finally:
        assert daemon.stop() == 0


def binary_request(x: np.ndarray, **params: object) -> tuple[bytes, int]:
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
            "parameters": params,
        }
    ).encode()
    return head + x.astype("<f4").tobytes(), len(head)


def post_raw(daemon: DaemonProc, body: bytes, head_len: int) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=10)
    conn.request(
        "POST",
        "/v2/models/demo/infer",
        body=body,
        headers={"Inference-Header-Content-Length": str(head_len)},
    )
    return conn.getresponse()


def test_binary_tensor_extension_round_trip(daemon: DaemonProc) -> None:
    golden = np.load(GOLDEN)
    body, head_len = binary_request(golden["x"], binary_data_output=True)
    resp = post_raw(daemon, body, head_len)
    data = resp.read()
    assert resp.status == 200
    n = int(resp.getheader("Inference-Header-Content-Length"))
    head = json.loads(data[:n])
    out = head["outputs"][0]
    assert out["parameters"]["binary_data_size"] == 8 * 3 * 4
    probs = np.frombuffer(data[n:], dtype="<f4").reshape(out["shape"])
    np.testing.assert_allclose(probs, golden["probs"], rtol=1e-5)
    # binary in, JSON out
    body, head_len = binary_request(golden["x"][:2])
    resp = post_raw(daemon, body, head_len)
    reply = json.loads(resp.read())
    np.testing.assert_allclose(
        np.array(reply["outputs"][0]["data"]).reshape(2, 3), golden["probs"][:2], rtol=1e-5
    )


def test_binary_size_mismatches_are_400(daemon: DaemonProc) -> None:
    x = np.zeros((1, 8), np.float32)
    body, head_len = binary_request(x)
    for raw, n, fragment in [
        (body[:-4], head_len, "binary data ends"),
        (body + b"\0\0\0\0", head_len, "belong to no input"),
        (body, len(body) + 5, "outside the body"),
        (
            body.replace(b'"binary_data_size": 32', b'"binary_data_size": 30'),
            head_len,
            "does not match",
        ),
    ]:
        resp = post_raw(daemon, raw, n)
        assert resp.status == 400
        assert fragment in json.loads(resp.read())["error"]


def raw_exchange(daemon: DaemonProc, request: bytes) -> bytes:
    """Send ``request`` (``Host: HOST`` in it becomes the daemon's address), read to EOF."""
    request = request.replace(b"Host: HOST", f"Host: {daemon.host}:{daemon.port}".encode())
    with socket.create_connection((daemon.host, daemon.port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def test_expect_100_continue_is_answered_before_the_body(daemon: DaemonProc) -> None:
    """curl sends Expect: 100-continue for bodies over 1 KiB and waits for the interim reply."""
    body = json.dumps({"inputs": [x_tensor(np.zeros((1, 8), np.float32))]}).encode()
    with socket.create_connection((daemon.host, daemon.port), timeout=10) as s:
        s.sendall(
            b"POST /v2/models/demo/infer HTTP/1.1\r\nExpect: 100-continue\r\n"
            + f"Host: {daemon.host}:{daemon.port}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert s.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        reply = b""
        while b'"outputs"' not in reply:
            reply += s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /v2/health/live HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"DELETE /v2/models/demo HTTP/1.1\r\nHost: HOST\r\n\r\n", b"405"),
        (b"POST /v2/models/demo/infer HTTP/1.1\r\nContent-Length: -3\r\n\r\n", b"400"),
        (b"POST /v2/models/demo/infer HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
        (b"GET /v2/health/live HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", b"431"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),
    ],
)
def test_malformed_http_gets_a_status_not_a_hang(
    daemon: DaemonProc, request_bytes: bytes, status: bytes
) -> None:
    reply = raw_exchange(daemon, request_bytes)
    assert reply.split(b" ", 2)[1] == status, reply[:200]
    assert b'{"error":' in reply
    assert daemon.request("GET", "/v2/health/live")[0] == 200


def test_http_1_0_closes_unless_keep_alive(daemon: DaemonProc) -> None:
    reply = raw_exchange(daemon, b"GET /v2/health/live HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in reply
