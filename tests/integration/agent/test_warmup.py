"""Models whose zero warm-up fails serve through a real ``inferd run`` with default settings:
ready, answering over HTTP like bare onnxruntime, and a failed warm-up is a warning event."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.support.models import reshape_15, run_bare, vad_feeds, vad_like


def tensor(name: str, arr: np.ndarray) -> dict[str, object]:
    dtype = {"float32": "FP32", "int64": "INT64"}[arr.dtype.name]
    return {"name": name, "shape": list(arr.shape), "datatype": dtype, "data": arr.ravel().tolist()}


def test_vad_shaped_and_never_warm_models_serve_with_default_settings(
    tmp_path: Path,
    inferd_daemon,
    broker,
    capture_factory,
) -> None:
    vad = vad_like(tmp_path / "vad.onnx")
    r15 = reshape_15(tmp_path / "r15.onnx")
    cap = capture_factory(broker, "inferd/warm-dev/events")
    daemon = inferd_daemon(
        {
            "device_id": "warm-dev",
            "models": [{"name": "vad", "path": str(vad)}, {"name": "r15", "path": str(r15)}],
            "mqtt": {"enabled": True, "host": broker.host, "port": broker.port},
            "updates": {"enabled": False},
        }
    )
    assert daemon.request("GET", "/v2/health/ready") == (200, {"ready": True})
    assert daemon.request("GET", "/v2/models/vad/ready")[0] == 200
    assert daemon.request("GET", "/v2/models/r15/ready")[0] == 200

    state = np.zeros((2, 1, 128), np.float32)
    for step in range(3):  # a stream of frames, the state fed back by the caller
        feeds = {**vad_feeds(), "state": state}
        status, body = daemon.infer("vad", [tensor(k, v) for k, v in feeds.items()])
        assert status == 200, body
        got = {
            o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]
        }
        want = run_bare(vad, feeds)
        np.testing.assert_allclose(got["output"], want[0], rtol=1e-6, err_msg=f"frame {step}")
        np.testing.assert_allclose(got["stateN"], want[1], rtol=1e-6)
        state = got["stateN"]

    x = np.arange(15, dtype=np.float32)
    status, body = daemon.infer("r15", [tensor("x", x)])
    assert status == 200, body
    assert body["outputs"][0]["data"] == x.tolist()

    status, body = daemon.infer("vad", [tensor("input", np.zeros((1, 512), np.float32))])
    assert status == 400 and body == {"error": "missing input 'state'"}

    def events() -> list[dict[str, str]]:
        return [json.loads(m.payload) for m in cap.on("/events")]

    assert cap.wait(lambda: any(e["kind"] == "agent-started" for e in events()), 10)
    seen = events()
    failed = [e for e in seen if e["kind"] == "warmup-failed"]
    assert [(e["model"], e["level"]) for e in failed] == [("r15", "warning")], seen
    assert "the model serves" in failed[0]["message"]
    assert "warm-up failed" in daemon.stderr()
