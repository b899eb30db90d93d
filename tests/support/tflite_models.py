"""Real TFLite models written with the schema bindings (no TensorFlow), each a few hundred bytes.

The writer is examples/models/make_tflite.py, the one the demo model script uses, loaded here by
path because examples/ is not a package.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

WRITER_PATH = Path(__file__).resolve().parents[2] / "examples" / "models" / "make_tflite.py"


def _load_writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tflite", WRITER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tflite = _load_writer()
TfliteGraph = make_tflite.TfliteGraph
write_tflite_classifier = make_tflite.write_tflite_classifier


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def classifier_weights(
    n_features: int = 4, n_classes: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``w`` [n_features, n_classes] (the ``x @ w`` layout) and bias ``b`` [n_classes]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_features, n_classes)).astype(np.float32)
    b = rng.normal(size=(n_classes,)).astype(np.float32)
    return w, b


def classifier(
    path: Path, w: np.ndarray | None = None, b: np.ndarray | None = None, seed: int = 0
) -> Path:
    """softmax(x @ w + b) as FULLY_CONNECTED(+bias) -> SOFTMAX: ``x`` [-1, in] -> ``probs``."""
    if w is None or b is None:
        w, b = classifier_weights(seed=seed)
    n_in, n_out = w.shape
    g = TfliteGraph()
    x = g.tensor("x", "float32", (-1, n_in))
    weights = g.tensor("w", "float32", (n_out, n_in), w.T)  # FULLY_CONNECTED wants [out, in]
    bias = g.tensor("b", "float32", (n_out,), b)
    logits = g.tensor("logits", "float32", (-1, n_out))
    probs = g.tensor("probs", "float32", (-1, n_out))
    g.op("FULLY_CONNECTED", [x, weights, bias], [logits], fused_activation_function="NONE")
    g.op("SOFTMAX", [logits], [probs], beta=1.0)
    return g.save(path, [x], [probs])


@dataclass(frozen=True)
class QuantizedFc:
    """A fully quantized y = x @ W.T + bias: every tensor integer with its scale and zero point."""

    dtype: str
    x_scale: float
    x_zero: int
    w_q: np.ndarray  # [out, in], of ``dtype``
    w_scale: float
    w_zero: int
    bias_q: np.ndarray  # int32, scale x_scale * w_scale, zero point 0
    y_scale: float
    y_zero: int

    def reference(self, x_q: np.ndarray) -> np.ndarray:
        """The quantized output computed in numpy (TFLite may differ by 1 in the last bit)."""
        acc = (x_q.astype(np.int64) - self.x_zero) @ (self.w_q.astype(np.int64) - self.w_zero).T
        acc = acc + self.bias_q
        y = np.round(acc * (self.x_scale * self.w_scale / self.y_scale)) + self.y_zero
        info = np.iinfo(self.dtype)
        return np.clip(y, info.min, info.max).astype(self.dtype)


def quantized_fc_params(
    dtype: str = "int8", n_in: int = 6, n_out: int = 4, seed: int = 0
) -> QuantizedFc:
    """Quantization of random float weights the way the TFLite converter does it."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_out, n_in))
    b = rng.normal(size=(n_out,))
    x_scale, y_scale = 0.05, 0.1
    w_scale = float(np.abs(w).max() / 127)
    # int8 kernels require symmetric weights (zero point 0); uint8 ones are asymmetric
    x_zero, y_zero, w_zero = (-3, 5, 0) if dtype == "int8" else (128, 120, 128)
    w_q = (np.round(w / w_scale) + w_zero).astype(dtype)
    bias_q = np.round(b / (x_scale * w_scale)).astype(np.int32)
    return QuantizedFc(dtype, x_scale, x_zero, w_q, w_scale, w_zero, bias_q, y_scale, y_zero)


def quantized_fc(path: Path, dtype: str = "int8", seed: int = 0) -> Path:
    """:func:`quantized_fc_params` as a model: ``x`` [-1, 6] of ``dtype`` -> ``y`` [-1, 4]."""
    q = quantized_fc_params(dtype, seed=seed)
    n_out, n_in = q.w_q.shape
    g = TfliteGraph()
    x = g.tensor("x", dtype, (-1, n_in), scale=q.x_scale, zero_point=q.x_zero)
    w = g.tensor("w", dtype, (n_out, n_in), q.w_q, scale=q.w_scale, zero_point=q.w_zero)
    b = g.tensor("b", "int32", (n_out,), q.bias_q, scale=q.x_scale * q.w_scale, zero_point=0)
    y = g.tensor("y", dtype, (-1, n_out), scale=q.y_scale, zero_point=q.y_zero)
    g.op("FULLY_CONNECTED", [x, w, b], [y], fused_activation_function="NONE")
    return g.save(path, [x], [y])


def add_mul(path: Path) -> Path:
    """Inputs ``a``, ``b`` [2, 3] float32; outputs ``sum`` = a + b and ``prod`` = a * b."""
    g = TfliteGraph()
    a = g.tensor("a", "float32", (2, 3))
    b = g.tensor("b", "float32", (2, 3))
    total = g.tensor("sum", "float32", (2, 3))
    prod = g.tensor("prod", "float32", (2, 3))
    g.op("ADD", [a, b], [total], fused_activation_function="NONE")
    g.op("MUL", [a, b], [prod], fused_activation_function="NONE")
    return g.save(path, [a, b], [total, prod])


def unsupported_op(path: Path) -> Path:
    """A well-formed model whose only operator is a custom op no runtime registers."""
    g = TfliteGraph()
    x = g.tensor("x", "float32", (1, 4))
    y = g.tensor("y", "float32", (1, 4))
    g.op("CUSTOM", [x], [y], custom_code="InferdNoSuchOp")
    return g.save(path, [x], [y])
