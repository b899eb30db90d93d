"""Operator-side look at a model file: its runtime, signature and outputs on golden inputs.

``inferctl model add`` signs these into the target so that each device can check a candidate
against what the operator published. Runtimes are imported only when a model needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import OperatorError
from runtime.tensors import V2_DATATYPES, Signature, TensorMeta

RUNTIME_BY_SUFFIX = {".onnx": "onnxruntime", ".tflite": "tflite"}

_ORT_TYPES = {f"tensor({t})": n for t, n in (("float", "float32"), ("double", "float64"))}
_ORT_TYPES.update({f"tensor({n})": n for n in V2_DATATYPES if n not in ("float32", "float64")})
_ORT_TYPES["tensor(string)"] = "str"


def runtime_for(path: Path, runtime: str | None = None) -> str:
    """The runtime named, or the one the file's suffix implies."""
    if runtime:
        return runtime
    try:
        return RUNTIME_BY_SUFFIX[path.suffix.lower()]
    except KeyError:
        raise OperatorError(
            f"{path}: cannot tell the runtime from the suffix; pass --runtime"
        ) from None


class ModelInfo:
    """A model loaded on the operator's machine to read its signature and run golden inputs."""

    def __init__(self, path: Path, runtime: str) -> None:
        self.path = path
        self.runtime = runtime
        self.signature: Signature
        self._run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
        if not path.is_file():
            raise OperatorError(f"{path}: model file not found")
        try:
            if runtime == "onnxruntime":
                self._open_onnx()
            elif runtime == "tflite":
                self._open_tflite()
            else:
                raise OperatorError(f"unknown runtime {runtime!r}; known: onnxruntime, tflite")
        except OperatorError:
            raise
        except Exception as err:
            raise OperatorError(f"{path}: cannot load with {runtime}: {err}") from err

    def _open_onnx(self) -> None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])

        def spec(node: Any) -> TensorMeta:
            shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
            return TensorMeta(node.name, V2_DATATYPES[_ORT_TYPES[node.type]], shape)

        self.signature = Signature(
            tuple(spec(i) for i in sess.get_inputs()), tuple(spec(o) for o in sess.get_outputs())
        )
        names = [o.name for o in self.signature.outputs]

        def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(names, sess.run(names, dict(feeds)), strict=True))

        self._run = run

    def _open_tflite(self) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as err:
            raise OperatorError(
                "tflite models need the tflite extra: pip install inferd[tflite]"
            ) from err
        interp = Interpreter(model_path=str(self.path))
        interp.allocate_tensors()

        def spec(d: dict[str, Any]) -> TensorMeta:
            sig = d.get("shape_signature", d["shape"])
            return TensorMeta(
                d["name"], V2_DATATYPES[np.dtype(d["dtype"]).name], tuple(int(x) for x in sig)
            )

        ins, outs = interp.get_input_details(), interp.get_output_details()
        self.signature = Signature(tuple(spec(d) for d in ins), tuple(spec(d) for d in outs))

        shapes = {d["index"]: tuple(d["shape"]) for d in ins}  # as currently allocated

        def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            for d in ins:
                arr = feeds[d["name"]]
                if tuple(arr.shape) != shapes[d["index"]]:
                    interp.resize_tensor_input(d["index"], arr.shape)
                    interp.allocate_tensors()
                    shapes[d["index"]] = tuple(arr.shape)
                interp.set_tensor(d["index"], arr)
            interp.invoke()
            return {d["name"]: interp.get_tensor(d["index"]) for d in outs}

        self._run = run

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for ``feeds``; OperatorError when the model rejects them."""
        try:
            return self._run(feeds)
        except Exception as err:
            raise OperatorError(f"{self.path}: the model rejects these inputs: {err}") from err
