"""Build the demo model: a small activity classifier over 8 accelerometer features.

Classes: idle, walking, running. The data are synthetic (three Gaussian clusters whose means
are shaped like the energy of an accelerometer window); the model is a 2-layer MLP trained here
with numpy so the repository needs no training framework. Run from the repository root:

    python examples/models/make_demo.py

It writes, next to this file:
  demo.onnx, demo-v2.onnx      version 1 and a retrained version 2 (same signature)
  demo.golden.npz              golden inputs ``x`` and expected ``probs`` of version 1
  demo-v2.golden.npz           the same for version 2
  demo.eval.npz                labelled evaluation data: ``x`` and ``y``
  demo.tflite                  a TFLite twin of version 1, when examples/models/make_tflite.py can
                               write one (needs the `tflite` and `flatbuffers` packages)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
CLASSES = ("idle", "walking", "running")
N_FEATURES = 8
HIDDEN = 16


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled feature rows: per-axis mean/energy features of three activities."""
    rng = np.random.default_rng(seed)
    centers = np.array(
        [
            [0.0, 0.0, 1.0, 0.05, 0.05, 0.05, 0.0, 0.1],  # idle: gravity only, little energy
            [0.2, 0.1, 1.0, 0.60, 0.50, 0.70, 1.8, 0.9],  # walking: ~2 Hz step cadence
            [0.3, 0.2, 1.1, 1.60, 1.40, 1.90, 2.9, 2.2],  # running: faster, much more energy
        ],
        dtype=np.float32,
    )
    y = rng.integers(0, len(CLASSES), size=n)
    x = centers[y] + rng.normal(scale=0.35, size=(n, N_FEATURES)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def train(x: np.ndarray, y: np.ndarray, steps: int, seed: int) -> dict[str, np.ndarray]:
    """Full-batch gradient descent on softmax(relu(x W1 + b1) W2 + b2) with cross-entropy."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(scale=0.5, size=(N_FEATURES, HIDDEN)).astype(np.float32)
    b1 = np.zeros(HIDDEN, np.float32)
    w2 = rng.normal(scale=0.5, size=(HIDDEN, len(CLASSES))).astype(np.float32)
    b2 = np.zeros(len(CLASSES), np.float32)
    onehot = np.eye(len(CLASSES), dtype=np.float32)[y]
    lr = 0.1
    for _ in range(steps):
        h = np.maximum(x @ w1 + b1, 0)
        p = softmax(h @ w2 + b2)
        g = (p - onehot) / len(x)
        gw2, gb2 = h.T @ g, g.sum(0)
        gh = (g @ w2.T) * (h > 0)
        gw1, gb1 = x.T @ gh, gh.sum(0)
        w1 -= lr * gw1
        b1 -= lr * gb1
        w2 -= lr * gw2
        b2 -= lr * gb2
    return {"W1": w1, "b1": b1, "W2": w2, "b2": b2}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(x @ params["W1"] + params["b1"], 0)
    return softmax(h @ params["W2"] + params["b2"]).astype(np.float32)


def to_onnx(params: dict[str, np.ndarray], path: Path, version: str) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["z0"]),
            helper.make_node("Add", ["z0", "b2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "activity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", N_FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", len(CLASSES)])],
        initializer=[numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inferd-demo"
    )
    model.ir_version = 8
    model.model_version = int(version)
    helper.set_model_props(model, {"classes": ",".join(CLASSES), "version": version})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def main() -> int:
    x_train, y_train = synthetic(3000, seed=1)
    x_eval, y_eval = synthetic(600, seed=2)
    golden_x = x_eval[:8]
    versions = {
        "demo": (train(x_train, y_train, 60, seed=3), "1"),
        "demo-v2": (train(x_train, y_train, 600, seed=4), "2"),
    }
    for stem, (params, version) in versions.items():
        to_onnx(params, HERE / f"{stem}.onnx", version)
        np.savez(HERE / f"{stem}.golden.npz", x=golden_x, probs=forward(params, golden_x))
        acc = float((forward(params, x_eval).argmax(1) == y_eval).mean())
        print(f"{stem}.onnx: version {version}, eval accuracy {acc:.3f}")
    np.savez(HERE / "demo.eval.npz", x=x_eval, y=y_eval)
    try:
        sys.path.insert(0, str(HERE))
        from make_tflite import write_tflite_classifier  # type: ignore[import-not-found]
    except ImportError as err:
        print(f"demo.tflite not written: {err}")
        return 0
    p = versions["demo"][0]
    write_tflite_classifier(HERE / "demo.tflite", p["W1"], p["b1"], p["W2"], p["b2"])
    print("demo.tflite: TFLite twin of version 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
