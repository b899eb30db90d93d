"""Real ONNX models built with onnx.helper for tests and benchmarks: no downloads, each a few
hundred bytes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # what onnxruntime 1.17+ on every target accepts


def save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def classifier(
    path: Path,
    n_features: int = 4,
    n_classes: int = 3,
    seed: int = 0,
    bias_shift: float = 0.0,
) -> Path:
    """softmax(x @ W + b): input ``x`` [N, n_features] float32, output ``probs`` [N, n_classes]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_features, n_classes)).astype(np.float32)
    b = (rng.normal(size=(n_classes,)) + bias_shift).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    return save(graph, path)


def classifier_weights(n_features: int = 4, n_classes: int = 3, seed: int = 0) -> tuple:
    """The (W, b) that :func:`classifier` uses for ``seed``, for computing expected outputs."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_features, n_classes)).astype(np.float32)
    b = rng.normal(size=(n_classes,)).astype(np.float32)
    return w, b


def elementwise(path: Path, op: str, dtype: int, shape: Sequence[int | str]) -> Path:
    """A one-node model ``y = op(x)`` over a tensor of ``dtype`` and ``shape``."""
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"])],
        f"{op.lower()}",
        [helper.make_tensor_value_info("x", dtype, list(shape))],
        [helper.make_tensor_value_info("y", dtype, list(shape))],
    )
    return save(graph, path)


def multi_io(path: Path) -> Path:
    """Inputs a, b [N,3] float32 and k int64 scalar; outputs sum = a + b, scaled = a * k."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["a", "kf"], ["scaled"]),
        ],
        "multi_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("k", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["N", 3]),
        ],
    )
    return save(graph, path)


def stateful(path: Path) -> Path:
    """A running sum: ``state_out = state_in + x``, ``y = state_out * 2`` over [1, 4] float32."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["state_in", "x"], ["state_out"]),
            helper.make_node("Add", ["state_out", "state_out"], ["y"]),
        ],
        "stateful",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, 4]),
        ],
    )
    return save(graph, path)


def failing(path: Path) -> Path:
    """Runs on zeros (so it loads and warms up), fails at run time when x[0, 0] >= 0.4.

    ``y = Gather(table, int(x[0, 0] * 10))`` over a 4-entry table: a large first value is an
    out-of-range index and onnxruntime raises, a real runtime error rather than a mock.
    """
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["x", "s0", "s1", "ax"], ["first"]),
            helper.make_node("Mul", ["first", "ten"], ["scaled"]),
            helper.make_node("Cast", ["scaled"], ["idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "idx"], ["picked"], axis=0),
            helper.make_node("Add", ["x", "picked"], ["y"]),
        ],
        "failing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[
            numpy_helper.from_array(np.array([0, 0], dtype=np.int64), "s0"),
            numpy_helper.from_array(np.array([1, 1], dtype=np.int64), "s1"),
            numpy_helper.from_array(np.array([0, 1], dtype=np.int64), "ax"),
            numpy_helper.from_array(np.array(10.0, dtype=np.float32), "ten"),
            numpy_helper.from_array(np.zeros(4, dtype=np.float32), "table"),
        ],
    )
    return save(graph, path)


def spin(path: Path) -> Path:
    """``count = n`` computed by a Loop adding 1 ``n`` times: int64 scalar input ``n``, output
    ``count`` [1] float32. About a microsecond per iteration, so ``n=10**10`` runs for hours."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "spin_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "cond", "acc0"], ["count"], body=body)],
        "spin",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("count", TensorProto.FLOAT, [1])],
        initializer=[
            numpy_helper.from_array(np.array(True), "cond"),
            numpy_helper.from_array(np.zeros(1, np.float32), "acc0"),
        ],
    )
    return save(graph, path)


def _from_nodes(
    path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: Sequence[Any] = ()
) -> Path:
    return save(helper.make_graph(nodes, path.stem, inputs, outputs, list(inits)), path)


# --- shaped like real models whose warm-up needs more than zeros with dims of 1 ------------------


def vad_like(path: Path) -> Path:
    """Shaped like a popular stateful voice-activity model: audio [batch, samples] padded by
    reflection (64 each side, so fewer than 65 samples fail), state [2, batch, 128] in and out,
    and a 0-d int64 sample rate."""
    return _from_nodes(
        path,
        [
            helper.make_node("Pad", ["input", "pads"], ["padded"], mode="reflect"),
            helper.make_node("ReduceMean", ["padded"], ["m"], axes=[1], keepdims=1),
            helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["srf", "rate"], ["scale"]),
            helper.make_node("Mul", ["m", "scale"], ["output"]),
            helper.make_node("Add", ["state", "m"], ["stateN"]),
        ],
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 128]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 128]),
        ],
        [
            numpy_helper.from_array(np.array([0, 64, 0, 64], np.int64), "pads"),
            numpy_helper.from_array(np.array(16000.0, np.float32), "rate"),
        ],
    )


def reshape_15(path: Path) -> Path:
    """``x`` [n] reshaped to [3, 5]: only n = 15 runs, which no power of two is."""
    return _from_nodes(
        path,
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [numpy_helper.from_array(np.array([3, 5], np.int64), "shape")],
    )


def vad_feeds(samples: int = 512, sr: int = 16000) -> dict[str, np.ndarray]:
    """A request for :func:`vad_like`: random audio, zero state, the sample rate."""
    rng = np.random.default_rng(3)
    return {
        "input": rng.normal(size=(1, samples)).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(sr, dtype=np.int64),
    }


def run_bare(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs from a plain onnxruntime CPU session."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def reflect_pad_refuses_short_axis(path: Path) -> bool:
    """Whether this onnxruntime refuses reflect padding wider than the axis, as current ones do
    (1.17, the oldest inferd allows, pads anyway: there the VAD shape warms up at dims 1)."""
    ones = {"input": np.zeros((1, 1), np.float32), "state": np.zeros((2, 1, 128), np.float32)}
    try:
        run_bare(path, {**ones, "sr": np.array(0, np.int64)})
    except Exception as err:
        if "Pad reflect requires axis length >= 2" not in str(err):
            raise
        return True
    return False
