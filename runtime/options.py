"""How a backend runs a model: runtime, execution providers, threads, warm-up, concurrency.

A model slot's config (``models[]`` in the YAML) is a :class:`RuntimeOptions` with the slot's
own keys added, so operators' files keep their flat shape while the backends, the operator's
tools and ``inferd tune`` share one type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

Scalar = str | int | float | bool
RUNTIME_BY_SUFFIX: dict[str, Literal["onnxruntime", "tflite"]] = {
    ".onnx": "onnxruntime",
    ".tflite": "tflite",
}
"""Model file suffix -> the runtime that reads it."""
PROVIDERS = ("tensorrt", "cuda", "openvino", "cpu")
"""ONNX Runtime execution providers inferd knows, in the order a GPU device prefers them."""
Provider = Literal["tensorrt", "cuda", "openvino", "cpu"]
OPENVINO_DEVICES = ("CPU", "GPU", "NPU")
"""OpenVINO devices an ``openvino_device_type`` names (``GPU.1`` picks one of several), alone or
in a virtual device over a list of them (``AUTO:GPU,CPU``, ``HETERO:NPU,CPU``, ``MULTI:...``)."""


class RuntimeOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Runtime settings of one model; the defaults serve on a CPU."""

    runtime: Literal["onnxruntime", "tflite"] = "onnxruntime"
    providers: tuple[Provider, ...] = ("cpu",)
    threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    optimized_model_cache: bool = False
    device_id: int = 0
    tensorrt_fp16: bool = False
    tensorrt_int8: bool = False
    openvino_device_type: str = "CPU"
    """The OpenVINO device: CPU, GPU (an Intel iGPU or Arc; GPU.0, GPU.1 when several), NPU, or
    AUTO:/HETERO:/MULTI: over a comma-separated list of them."""
    openvino_precision: Literal["FP32", "FP16", "ACCURACY"] | None = None
    """OpenVINO inference precision; unset: the device's default (CPU FP32, GPU and NPU FP16).
    ACCURACY keeps the model's own precision."""
    provider_options: dict[str, dict[str, Scalar]] = {}
    warmup_runs: int = 1
    warmup_inputs: str | None = None
    """An npz of inputs to warm up on (arrays named like the inputs) when the model ships no
    golden inputs."""
    warmup_shapes: dict[str, tuple[int, ...]] = {}
    """Per input, the shape of the zeros to warm up on (inputs not named: dynamic dims 1)."""
    max_concurrency: int = 4
    max_batch: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Dynamic batching: concurrent requests are run together up to this many rows along the
    first axis (0 or 1: off). Only for models whose inputs all have a dynamic first axis."""
    batch_window_us: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    """How long a batch waits for more requests after its first one, in microseconds; at most
    a second, so that requests queued at SIGTERM are answered within the API's 5 s drain."""
    name: str = "model"
    """Which model these options are for, in log lines (a slot's name)."""

    def __post_init__(self) -> None:
        if not self.providers:
            raise ValueError(f"providers must name at least one of {', '.join(PROVIDERS)}")
        if len(set(self.providers)) != len(self.providers):
            raise ValueError("providers must not repeat")
        for bad in set(self.provider_options) - set(PROVIDERS):
            raise ValueError(f"provider_options key {bad!r} is not one of {', '.join(PROVIDERS)}")
        if not _openvino_device_ok(self.openvino_device_type):
            raise ValueError(
                f"openvino_device_type {self.openvino_device_type!r} is not a device: CPU, GPU,"
                " GPU.<n>, NPU, or AUTO:/HETERO:/MULTI: with a comma-separated list of them"
            )
        if self.openvino_precision == "FP16" and self.openvino_device_type.startswith("CPU"):
            raise ValueError(
                "openvino_precision FP16 needs a GPU or NPU: an OpenVINO CPU runs FP32 or ACCURACY"
            )
        if self.threads < 0 or self.inter_op_threads < 0:
            raise ValueError("threads must be >= 0 (0 lets the runtime choose)")
        if self.warmup_runs < 0:
            raise ValueError("warmup_runs must be >= 0")
        for name, shape in self.warmup_shapes.items():
            if any(d < 0 for d in shape):
                raise ValueError(f"warmup_shapes[{name!r}] must not have negative dimensions")
        if self.warmup_inputs is not None and self.warmup_shapes:
            raise ValueError("give warmup_inputs or warmup_shapes, not both")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.max_batch < 0:
            raise ValueError("max_batch must be >= 0 (0 or 1: no batching)")
        if not 0 <= self.batch_window_us <= 1_000_000:
            raise ValueError("batch_window_us must be 0-1000000 (at most a second)")


def _openvino_device_ok(text: str) -> bool:
    kind, colon, rest = text.partition(":")
    if kind in ("AUTO", "HETERO", "MULTI"):
        return not colon or all(_plain_device(d) for d in rest.split(","))
    return not colon and _plain_device(kind)


def _plain_device(text: str) -> bool:
    name, dot, index = text.partition(".")
    return name in OPENVINO_DEVICES and (not dot or index.isdigit())


def runtime_for(path: str | Path) -> Literal["onnxruntime", "tflite"] | None:
    """The runtime a model file's suffix implies (``.onnx``, ``.tflite``), None when unknown."""
    return RUNTIME_BY_SUFFIX.get(Path(path).suffix.lower())
