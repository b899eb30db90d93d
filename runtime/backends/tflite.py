"""LiteRT/TFLite backend: ai-edge-litert, else tflite-runtime where that is what the device has.

A LiteRT ``Interpreter`` must not be called from two threads at once, but ``invoke`` releases the
GIL, so concurrent requests each borrow an interpreter from a small pool that grows on demand up
to ``max_concurrency``; an idle model keeps one. Measured on 2 cores, a compute-bound model served
from 8 threads runs 1.5-1.8x faster with a pool than behind one lock; the price is memory, each
extra interpreter holding its own arena and XNNPACK-packed weights (about twice the file size),
so ``max_concurrency: 1`` is the setting for a tight device. Only APIs that ai-edge-litert 1.4.0
(what pip resolves on aarch64) and tflite-runtime 2.14 share are used; both are tested.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.backends.base import Backend, TensorSpec, one_line
from runtime.errors import BackendUnavailableError, ModelLoadError
from runtime.tensors import V2_DATATYPES

try:
    from ai_edge_litert.interpreter import Interpreter

    RUNTIME_PACKAGE = "ai-edge-litert"
except ImportError:
    try:
        from tflite_runtime.interpreter import Interpreter

        RUNTIME_PACKAGE = "tflite-runtime"
    except ImportError as _err:
        raise BackendUnavailableError(
            "no TFLite runtime (ai-edge-litert or tflite-runtime) is installed: "
            "pip install inferd[tflite]"
        ) from _err

log = logging.getLogger(__name__)


class _Worker:
    """One interpreter and the input shapes its tensors are currently allocated for."""

    def __init__(self, interpreter: Any, shapes: dict[int, tuple[int, ...]]) -> None:
        self.interpreter = interpreter
        self.shapes = shapes

    def run(
        self, inputs: Mapping[str, int], feeds: Mapping[str, np.ndarray], outputs: Sequence[int]
    ) -> list[np.ndarray]:
        interp = self.interpreter
        resize = {
            inputs[name]: arr.shape
            for name, arr in feeds.items()
            if self.shapes.get(inputs[name]) != arr.shape
        }
        if resize:
            try:
                for index, shape in resize.items():
                    # strict: only dimensions the model declares dynamic may change
                    interp.resize_tensor_input(index, shape, strict=True)
                interp.allocate_tensors()
            except Exception:
                self.shapes = {}  # allocation state unknown: resize everything next time
                raise
            self.shapes.update(resize)
        for name, arr in feeds.items():
            interp.set_tensor(inputs[name], arr)
        interp.invoke()
        return [interp.get_tensor(index) for index in outputs]  # copies, safe to hand out


class TfliteBackend(Backend):
    runtime = "tflite"
    extra = "inferd[tflite]"

    def _new_worker(self) -> _Worker:
        threads = self.options.threads or None  # 0: the runtime's default
        interp = Interpreter(model_path=str(self.path), num_threads=threads)
        interp.allocate_tensors()
        shapes = {d["index"]: tuple(int(n) for n in d["shape"]) for d in interp.get_input_details()}
        return _Worker(interp, shapes)

    def _load(self) -> None:
        try:
            worker = self._new_worker()
            interp = worker.interpreter
            in_details = interp.get_input_details()
            out_details = interp.get_output_details()
            self.inputs = tuple(_spec(d) for d in in_details)
            self.outputs = tuple(_spec(d) for d in out_details)
        except Exception as err:
            raise ModelLoadError(f"{self.path}: cannot load TFLite model: {one_line(err)}") from err
        self.providers = ("cpu",)
        self._input_index = {d["name"]: int(d["index"]) for d in in_details}
        self._output_index = {d["name"]: int(d["index"]) for d in out_details}
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._idle.put(worker)
        self._created = 1
        self._grow_lock = threading.Lock()
        log.debug("%s: loaded with %s", self.path, RUNTIME_PACKAGE)

    def _borrow(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._grow_lock:
            grow = self._created < self.options.max_concurrency
            if grow:
                self._created += 1
        if not grow:
            return self._idle.get()
        try:
            return self._new_worker()
        except BaseException:
            with self._grow_lock:
                self._created -= 1
            raise

    def _run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        # the base class checked that every input is fed (an unfed one would silently keep
        # the previous request's data) and that the output names exist
        names = list(output_names) if output_names else list(self._output_index)
        indices = [self._output_index[name] for name in names]
        idle = self._idle
        worker = self._borrow()
        try:
            results = worker.run(self._input_index, feeds, indices)
        finally:
            idle.put(worker)
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        idle = self.__dict__.pop("_idle", None)
        while idle is not None and not idle.empty():
            idle.get_nowait()


def _spec(detail: Mapping[str, Any]) -> TensorSpec:
    name = str(detail["name"])
    dtype = np.dtype(detail["dtype"]).name
    if dtype not in V2_DATATYPES:
        raise ModelLoadError(f"tensor {name!r} has unsupported type {dtype}")
    signature = detail.get("shape_signature")
    if signature is None or len(signature) != len(detail["shape"]):
        signature = detail["shape"]
    shape = tuple(int(d) if d >= 0 else None for d in signature)
    scale, zero_point = None, None
    params = detail.get("quantization_parameters") or {}
    scales = params.get("scales", ())
    # per-tensor quantization only; per-channel scales never sit on a model's inputs/outputs
    if len(scales) == 1 and scales[0] != 0:
        scale = float(str(scales[0]))  # the shortest decimal of the float32: 0.05, not 0.0500000007
        zero_point = int(params["zero_points"][0])
    return TensorSpec(name, dtype, shape, scale, zero_point)
